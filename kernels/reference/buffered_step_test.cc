#include "kernels/reference/buffered_step.h"

#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/gdn_oracle.h"
#include "kernels/reference/reference_test_util.h"

namespace kvbuffer {
namespace {

using testing::KernelSequence;
using testing::Preset;
using testing::RandomActivations;
using testing::RelErr;

constexpr double kTol = 1e-5;

TEST(BufferedStepTest, DecodeWithFoldsEveryCTokensMatchesOracle) {
  std::mt19937 rng(301);
  for (const char* name : {"tiny", "small"}) {
    for (int32_t C : {1, 4, 16}) {
      const ModelConfig c = Preset(name);
      const auto params = MakeAllLayerParams(c);
      const int32_t layer = c.num_layers - 1;
      OracleSequence oracle(c, &params);
      KernelSequence seq(c, params[layer]);
      const int32_t T = 4 * C + 3;  // >= 3 flushes (stateless until the first)
      auto act = RandomActivations(c, T, rng);
      double worst = 0;
      int32_t folds = 0;
      for (int32_t t = 0; t < T; ++t) {
        if (seq.buffer_rows() + 1 > C) {
          seq.Fold();
          ++folds;
        }
        const auto got = seq.Step(act, t, 1);
        const auto want = oracle.Append(layer, act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), 1);
        ASSERT_LE(RelErr(got, want, &worst), kTol) << name << " C=" << C << " t=" << t;
      }
      EXPECT_GE(folds, 3);
      std::printf("[decode] %s C=%d worst relative error %.3g\n", name, C, worst);
    }
  }
}

TEST(BufferedStepTest, VerifyDraftsByForwardSubstitutionEqualsSequential) {
  std::mt19937 rng(302);
  for (const char* name : {"tiny", "small"}) {
    const ModelConfig c = Preset(name);
    const auto params = MakeAllLayerParams(c);
    double worst_oracle = 0, worst_seq = 0;
    for (bool with_state : {false, true}) {
      for (int32_t m = 1; m <= 16; ++m) {
        OracleSequence oracle(c, &params);
        KernelSequence seq(c, params[0]);
        const int32_t prefix = 11;
        auto act = RandomActivations(c, prefix + m, rng);
        for (int32_t t = 0; t < prefix; ++t) {
          if (with_state && t == 6) seq.Fold();  // checkpoint + 5 buffered rows
          seq.Step(act, t, 1);
        }
        oracle.Append(0, act.qkv.data(), act.a.data(), act.b.data(), prefix);
        ASSERT_EQ(seq.has_state(), with_state);
        // All m drafts at once against the same checkpoint and buffer.
        const auto verified = seq.Verify(act, prefix, m);
        // The same drafts one at a time, each appended before the next.
        KernelSequence one_by_one = seq;
        std::vector<float> sequential;
        for (int32_t i = 0; i < m; ++i) {
          const auto o = one_by_one.Step(act, prefix + i, 1);
          sequential.insert(sequential.end(), o.begin(), o.end());
        }
        const auto want =
            oracle.Append(0, act.qkv_at(c, prefix), act.a_at(c, prefix), act.b_at(c, prefix), m);
        ASSERT_LE(RelErr(verified, want, &worst_oracle), kTol) << name << " m=" << m;
        std::vector<double> seq_d(sequential.begin(), sequential.end());
        ASSERT_LE(RelErr(verified, seq_d, &worst_seq), kTol) << name << " m=" << m;
        // A verify changes nothing: the sequence still decodes the first draft identically.
        EXPECT_EQ(seq.buffer_rows(), with_state ? 5 : prefix);
      }
    }
    std::printf("[verify] %s worst vs oracle %.3g, vs sequential %.3g\n", name, worst_oracle,
                worst_seq);
  }
}

TEST(BufferedStepTest, CommittedMultiTokenAppendMatchesOracle) {
  std::mt19937 rng(303);
  const ModelConfig c = Preset("small");
  const auto params = MakeAllLayerParams(c);
  OracleSequence oracle(c, &params);
  KernelSequence seq(c, params[2]);
  auto act = RandomActivations(c, 60, rng);
  double worst = 0;
  int32_t t = 0;
  for (int32_t m : {3, 1, 7, 16, 2, 9, 5, 12, 4}) {
    if (seq.buffer_rows() + m > 16) seq.Fold();
    const auto got = seq.Step(act, t, m);
    const auto want = oracle.Append(2, act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), m);
    ASSERT_LE(RelErr(got, want, &worst), kTol) << "m=" << m;
    t += m;
  }
  std::printf("[multi-append] worst %.3g\n", worst);
}

TEST(BufferedStepTest, StatelessBufferUpTo64RowsThenFirstFold) {
  std::mt19937 rng(304);
  for (const char* name : {"tiny", "small"}) {
    const ModelConfig c = Preset(name);
    const auto params = MakeAllLayerParams(c);
    OracleSequence oracle(c, &params);
    KernelSequence seq(c, params[1]);
    auto act = RandomActivations(c, 64 + 20, rng);
    double worst = 0;
    for (int32_t t = 0; t < 64; ++t) {
      const auto got = seq.Step(act, t, 1);
      ASSERT_FALSE(seq.has_state());
      const auto want = oracle.Append(1, act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), 1);
      ASSERT_LE(RelErr(got, want, &worst), kTol) << name << " t=" << t;
    }
    EXPECT_EQ(seq.buffer_rows(), 64);
    seq.Fold();  // the first flush allocates the state
    for (int32_t t = 64; t < 84; ++t) {
      if (seq.buffer_rows() + 1 > 16) seq.Fold();
      const auto got = seq.Step(act, t, 1);
      const auto want = oracle.Append(1, act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), 1);
      ASSERT_LE(RelErr(got, want, &worst), kTol) << name << " t=" << t;
    }
    std::printf("[stateless] %s worst %.3g\n", name, worst);
  }
}

TEST(BufferedStepTest, NewRowGatesAreCumulativeFromTheLastBufferRow) {
  std::mt19937 rng(305);
  const ModelConfig c = Preset("tiny");
  const auto params = MakeAllLayerParams(c);
  auto act = RandomActivations(c, 4, rng);
  std::vector<float> win((c.conv_width - 1) * c.channels(), 0.0f);
  PreparedTokens tok;
  PrepareTokens(c, params[0], win.data(), act.qkv.data(), act.a.data(), act.b.data(), 4, &tok);
  const int32_t HV = c.num_v_heads;
  // A one-row buffer with a known G.
  std::vector<float> bk(tok.k.begin(), tok.k.begin() + c.num_k_heads * c.head_k_dim);
  std::vector<float> bu(c.out_elems(), 0.5f);
  std::vector<float> bG(HV, -0.75f);
  BufferRows rows{bk.data(), bu.data(), bG.data(), 1};
  std::vector<float> out(4 * c.out_elems()), nu(out.size()), nG(4 * HV);
  BufferedStep(c, nullptr, rows, tok, out.data(), nu.data(), nG.data());
  for (int32_t h = 0; h < HV; ++h) {
    double acc = -0.75;
    for (int32_t i = 0; i < 4; ++i) {
      acc += tok.g[i * HV + h];
      EXPECT_NEAR(nG[i * HV + h], acc, 1e-6 * (1 + std::fabs(acc)));
    }
  }
}

}  // namespace
}  // namespace kvbuffer
