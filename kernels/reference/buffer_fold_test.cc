#include "kernels/reference/buffer_fold.h"

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

constexpr double kTol = 1e-5;

TEST(BufferFoldTest, FoldEqualsRecurrence) {
  std::mt19937 rng(401);
  for (const char* name : {"tiny", "small"}) {
    const ModelConfig c = Preset(name);
    const auto params = MakeAllLayerParams(c);
    double worst = 0;
    for (int32_t n : {1, 2, 7, 16, 64}) {
      OracleSequence oracle(c, &params);
      KernelSequence seq(c, params[0]);
      auto act = RandomActivations(c, 3 * n, rng);
      // Three folds of n rows each: the first from no state, the next two onto a state.
      for (int32_t f = 0; f < 3; ++f) {
        for (int32_t t = f * n; t < (f + 1) * n; ++t) seq.Step(act, t, 1);
        seq.Fold();
        oracle.Append(0, act.qkv_at(c, f * n), act.a_at(c, f * n), act.b_at(c, f * n), n);
        const double e =
            RelativeError(seq.state().data(), oracle.state(0).data(), oracle.state(0).size());
        worst = std::max(worst, e);
        ASSERT_LE(e, kTol) << name << " n=" << n << " fold " << f;
      }
    }
    std::printf("[fold] %s worst state relative error %.3g\n", name, worst);
  }
}

TEST(BufferFoldTest, EmptyBufferLeavesStateOrZeroes) {
  const ModelConfig c = Preset("tiny");
  std::vector<float> S(c.state_elems(), 1.5f);
  FoldBuffer(c, S.data(), false, BufferRows{});
  for (float s : S) EXPECT_EQ(s, 1.5f);
  std::fill(S.begin(), S.end(), std::numeric_limits<float>::quiet_NaN());
  FoldBuffer(c, S.data(), true, BufferRows{});
  for (float s : S) EXPECT_EQ(s, 0.0f);
}

TEST(BufferFoldTest, NewStateIgnoresGarbage) {
  // state_is_zero must not read the slot (a fresh slot may hold NaN).
  std::mt19937 rng(402);
  const ModelConfig c = Preset("tiny");
  const auto params = MakeAllLayerParams(c);
  auto act = RandomActivations(c, 5, rng);
  std::vector<float> win((c.conv_width - 1) * c.channels(), 0.0f);
  PreparedTokens tok;
  PrepareTokens(c, params[0], win.data(), act.qkv.data(), act.a.data(), act.b.data(), 5, &tok);
  std::vector<float> out(5 * c.out_elems()), u(out.size()), G(5 * c.num_v_heads);
  BufferedStep(c, nullptr, BufferRows{}, tok, out.data(), u.data(), G.data());
  BufferRows rows{tok.k.data(), u.data(), G.data(), 5};
  std::vector<float> clean(c.state_elems(), 0.0f);
  std::vector<float> dirty(c.state_elems(), std::numeric_limits<float>::quiet_NaN());
  FoldBuffer(c, clean.data(), false, rows);
  FoldBuffer(c, dirty.data(), true, rows);
  EXPECT_EQ(clean, dirty);
}

}  // namespace
}  // namespace kvbuffer
