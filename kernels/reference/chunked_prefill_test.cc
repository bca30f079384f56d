#include "kernels/reference/chunked_prefill.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
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
constexpr int32_t kFlush = 16;
constexpr int32_t kDecodeAfter = 2 * kFlush + 3;  // crosses at least two flushes

// Oracle outputs of every token of `act` on `layer`.
std::vector<double> OracleOutputs(const ModelConfig& c, const std::vector<LayerParams>& params,
                                  int32_t layer, const testing::Activations& act) {
  OracleSequence oracle(c, &params);
  return oracle.Append(layer, act.qkv.data(), act.a.data(), act.b.data(), act.num_tokens);
}

std::vector<double> Slice(const std::vector<double>& all, const ModelConfig& c, int32_t t0,
                          int32_t n) {
  return std::vector<double>(all.begin() + static_cast<size_t>(t0) * c.out_elems(),
                             all.begin() + static_cast<size_t>(t0 + n) * c.out_elems());
}

// Prefills `T` tokens after `prefix` decoded ones, folding fold_tokens, then decodes with a flush
// every kFlush rows; every output is compared with the oracle's.
void RunPrefillThenDecode(const ModelConfig& c, const std::vector<LayerParams>& params,
                          const testing::Activations& act, const std::vector<double>& want,
                          int32_t prefix, int32_t T, int32_t fold_tokens, double* worst) {
  KernelSequence seq(c, params[0]);
  for (int32_t t = 0; t < prefix; ++t) seq.Step(act, t, 1);
  const auto got = seq.Prefill(act, prefix, T, fold_tokens);
  ASSERT_LE(RelErr(got, Slice(want, c, prefix, T), worst), kTol)
      << "prefix " << prefix << " T=" << T << " fold " << fold_tokens;
  ASSERT_EQ(seq.buffer_rows(), T - fold_tokens);
  for (int32_t t = prefix + T; t < prefix + T + kDecodeAfter; ++t) {
    // The first decode step reads the whole prefill tail as its buffer; later ones flush every
    // kFlush rows.
    if (t > prefix + T && seq.buffer_rows() + 1 > kFlush) seq.Fold();
    const auto o = seq.Step(act, t, 1);
    ASSERT_LE(RelErr(o, Slice(want, c, t, 1), worst), kTol)
        << "decode t=" << t << " after T=" << T << " fold " << fold_tokens;
  }
}

TEST(ChunkedPrefillTest, EveryLengthUpTo300WithVariousFoldPointsThenDecode) {
  std::mt19937 rng(501);
  const ModelConfig c = Preset("tiny");
  const auto params = MakeAllLayerParams(c);
  // One long random sequence: outputs of token t do not depend on how it was processed.
  auto act = RandomActivations(c, 300 + kDecodeAfter, rng);
  const auto want = OracleOutputs(c, params, 0, act);
  double worst = 0;
  std::uniform_int_distribution<int32_t> any(0, 1 << 30);
  for (int32_t T = 1; T <= 300; ++T) {
    std::vector<int32_t> folds = {T, T - T % kFlush, any(rng) % (T + 1)};
    if (T % 10 == 0) folds.push_back(0);
    for (int32_t f : folds) {
      RunPrefillThenDecode(c, params, act, want, 0, T, f, &worst);
      if (HasFatalFailure()) return;
    }
  }
  std::printf("[prefill] tiny, T = 1..300, worst relative error %.3g\n", worst);
}

TEST(ChunkedPrefillTest, FromExistingStateAndWindowAtChunkEdges) {
  std::mt19937 rng(502);
  const ModelConfig c = Preset("small");
  const auto params = MakeAllLayerParams(c);
  const int32_t prefix = 21;  // stateless buffer of 21 rows, folded before the prefill
  auto act = RandomActivations(c, prefix + 300 + kDecodeAfter, rng);
  const auto want = OracleOutputs(c, params, 0, act);
  double worst = 0;
  for (int32_t T : {1, 2, 63, 64, 65, 127, 128, 129, 191, 300}) {
    for (int32_t f : {T, 0, T / 2, T - T % kFlush, T > 64 ? 64 : T, T > 70 ? 70 : 1}) {
      RunPrefillThenDecode(c, params, act, want, prefix, T, f, &worst);
      if (HasFatalFailure()) return;
    }
  }
  std::printf("[prefill] small from a state, worst relative error %.3g\n", worst);
}

TEST(ChunkedPrefillTest, StateAtFoldPointEqualsRecurrence) {
  std::mt19937 rng(503);
  const ModelConfig c = Preset("small");
  const auto params = MakeAllLayerParams(c);
  auto act = RandomActivations(c, 200, rng);
  for (int32_t f : {0, 1, 50, 64, 100, 128, 200}) {
    std::vector<float> win((c.conv_width - 1) * c.channels(), 0.0f);
    PreparedTokens tok;
    PrepareTokens(c, params[0], win.data(), act.qkv.data(), act.a.data(), act.b.data(), 200, &tok);
    std::vector<float> S(c.state_elems(), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> out(200 * c.out_elems()), u(out.size()), G((200 - f) * c.num_v_heads);
    ChunkedPrefill(c, S.data(), true, tok, f, out.data(), u.data(), G.data());
    OracleSequence oracle(c, &params);
    if (f > 0) oracle.Append(0, act.qkv.data(), act.a.data(), act.b.data(), f);
    if (f == 0) {
      for (float s : S) ASSERT_EQ(s, 0.0f);
      continue;
    }
    EXPECT_LE(RelativeError(S.data(), oracle.state(0).data(), S.size()), kTol) << f;
    // tail_G is the cumulative gate from the fold point.
    for (int32_t h = 0; h < c.num_v_heads; ++h) {
      double acc = 0;
      for (int32_t t = f; t < 200; ++t) {
        acc += tok.g[t * c.num_v_heads + h];
        ASSERT_NEAR(G[(t - f) * c.num_v_heads + h], acc, 1e-6 * (1 + std::fabs(acc)));
      }
    }
  }
}

}  // namespace
}  // namespace kvbuffer
