#include "kernels/reference/gdn_oracle.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/reference_test_util.h"

namespace kvbuffer {
namespace {

using testing::Preset;
using testing::RandomActivations;

TEST(GdnOracleTest, ScalarModelMatchesHandRecurrence) {
  // H = HV = K = V = 1, W = 2: every quantity is a scalar and the recurrence can be written out.
  ModelConfig c;
  c.num_layers = 1;
  c.num_k_heads = 1;
  c.num_v_heads = 1;
  c.head_k_dim = 1;
  c.head_v_dim = 1;
  c.conv_width = 2;
  ASSERT_EQ(ValidateModelConfig(c), "");
  std::vector<LayerParams> params = MakeAllLayerParams(c);
  OracleSequence oracle(c, &params);
  std::mt19937 rng(201);
  auto act = RandomActivations(c, 20, rng);
  const LayerParams& p = params[0];
  double S = 0, prev[3] = {0, 0, 0};
  for (int32_t t = 0; t < 20; ++t) {
    double x[3];
    for (int32_t ch = 0; ch < 3; ++ch) {
      const double cur = act.qkv[t * 3 + ch];
      const double s = p.conv_weight[ch * 2] * prev[ch] + p.conv_weight[ch * 2 + 1] * cur;
      x[ch] = s / (1 + std::exp(-s));
      prev[ch] = cur;
    }
    const double q = x[0] / std::sqrt(x[0] * x[0] + 1e-6);
    const double k = x[1] / std::sqrt(x[1] * x[1] + 1e-6);
    const double z = double(act.a[t]) + p.dt_bias[0];
    const double g = -std::exp(double(p.a_log[0])) * (z > 20 ? z : std::log1p(std::exp(z)));
    const double beta = 1 / (1 + std::exp(-double(act.b[t])));
    const double St = std::exp(g) * S;
    const double u = beta * (x[2] - St * k);
    S = St + k * u;
    const std::vector<double> o =
        oracle.Append(0, act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), 1);
    ASSERT_EQ(o.size(), 1u);
    EXPECT_NEAR(o[0], S * q, 1e-12 * (1 + std::fabs(S * q))) << t;
    EXPECT_NEAR(oracle.state(0)[0], S, 1e-12 * (1 + std::fabs(S)));
  }
  EXPECT_EQ(oracle.position(0), 20);
}

TEST(GdnOracleTest, BatchedAppendEqualsTokenByToken) {
  std::mt19937 rng(202);
  const ModelConfig c = Preset("tiny");
  const auto params = MakeAllLayerParams(c);
  OracleSequence batched(c, &params), single(c, &params);
  auto act = RandomActivations(c, 13, rng);
  const std::vector<double> all = batched.Append(1, act.qkv.data(), act.a.data(), act.b.data(), 13);
  for (int32_t t = 0; t < 13; ++t) {
    const auto o = single.Append(1, act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), 1);
    for (int32_t i = 0; i < c.out_elems(); ++i) ASSERT_EQ(o[i], all[t * c.out_elems() + i]);
  }
  EXPECT_EQ(batched.state(1), single.state(1));
  EXPECT_EQ(batched.position(1), 13);
  EXPECT_EQ(batched.position(0), 0);  // layers are independent
  for (double s : batched.state(0)) EXPECT_EQ(s, 0.0);
}

TEST(GdnOracleTest, CopiesEvaluateDraftsIndependently) {
  std::mt19937 rng(203);
  const ModelConfig c = Preset("tiny");
  const auto params = MakeAllLayerParams(c);
  OracleSequence seq(c, &params);
  auto act = RandomActivations(c, 6, rng);
  seq.Append(0, act.qkv.data(), act.a.data(), act.b.data(), 3);
  OracleSequence drafts = seq;
  drafts.Append(0, act.qkv_at(c, 3), act.a_at(c, 3), act.b_at(c, 3), 3);
  EXPECT_EQ(seq.position(0), 3);
  EXPECT_EQ(drafts.position(0), 6);
  EXPECT_NE(seq.state(0), drafts.state(0));
}

TEST(GdnOracleTest, StateStaysBoundedOverLongSequences) {
  // |k^| = 1 and 0 < beta < 1 keep the delta rule contractive: no blow-up over many tokens.
  std::mt19937 rng(204);
  const ModelConfig c = Preset("small");
  const auto params = MakeAllLayerParams(c);
  OracleSequence seq(c, &params);
  auto act = RandomActivations(c, 400, rng);
  const auto out = seq.Append(0, act.qkv.data(), act.a.data(), act.b.data(), 400);
  for (double o : out) ASSERT_TRUE(std::isfinite(o));
  double norm = 0;
  for (double s : seq.state(0)) norm += s * s;
  EXPECT_GT(norm, 0.0);
  EXPECT_LT(norm, 1e6);
}

TEST(GdnOracleTest, RelativeErrorDefinition) {
  const double want[3] = {3.0, 0.0, 4.0};
  const float exact[3] = {3.0f, 0.0f, 4.0f};
  const float off[3] = {3.0f, 1.0f, 4.0f};
  EXPECT_EQ(RelativeError(exact, want, 3), 0.0);
  EXPECT_DOUBLE_EQ(RelativeError(off, want, 3), 1.0 / 5.0);
  const float nan[3] = {3.0f, std::numeric_limits<float>::quiet_NaN(), 4.0f};
  EXPECT_EQ(RelativeError(nan, want, 3), std::numeric_limits<double>::infinity());
  const float inf[3] = {3.0f, std::numeric_limits<float>::infinity(), 4.0f};
  EXPECT_EQ(RelativeError(inf, want, 3), std::numeric_limits<double>::infinity());
}

}  // namespace
}  // namespace kvbuffer
