#include "kernels/reference/token_prep.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/gdn_oracle.h"
#include "kernels/reference/reference_test_util.h"

namespace kvbuffer {
namespace {

using testing::Preset;
using testing::RandomActivations;

// fp64 preparation of T tokens written directly from DESIGN §2, for comparison.
struct DoublePrep {
  std::vector<double> q, k, v, g, beta;
};

DoublePrep PrepareInDouble(const ModelConfig& c, const LayerParams& p,
                           const std::vector<float>& window, const std::vector<float>& qkv,
                           const std::vector<float>& a, const std::vector<float>& b, int32_t T) {
  const int32_t H = c.num_k_heads, HV = c.num_v_heads, K = c.head_k_dim, V = c.head_v_dim;
  const int32_t W = c.conv_width, ch = c.channels();
  std::vector<double> rows;  // window ++ qkv
  rows.insert(rows.end(), window.begin(), window.end());
  rows.insert(rows.end(), qkv.begin(), qkv.end());
  DoublePrep d;
  for (int32_t t = 0; t < T; ++t) {
    std::vector<double> x(ch);
    for (int32_t cc = 0; cc < ch; ++cc) {
      double s = 0;
      for (int32_t i = 0; i < W; ++i) {
        s += static_cast<double>(p.conv_weight[cc * W + i]) * rows[(t + i) * ch + cc];
      }
      x[cc] = s / (1 + std::exp(-s));
    }
    for (int32_t h = 0; h < H; ++h) {
      double nq = 0, nk = 0;
      for (int32_t i = 0; i < K; ++i) {
        nq += x[h * K + i] * x[h * K + i];
        nk += x[(H + h) * K + i] * x[(H + h) * K + i];
      }
      for (int32_t i = 0; i < K; ++i) {
        d.q.push_back(x[h * K + i] / std::sqrt(nq + 1e-6) / std::sqrt(double(K)));
      }
      for (int32_t i = 0; i < K; ++i) d.k.push_back(x[(H + h) * K + i] / std::sqrt(nk + 1e-6));
    }
    for (int32_t i = 0; i < HV * V; ++i) d.v.push_back(x[2 * H * K + i]);
    for (int32_t h = 0; h < HV; ++h) {
      const double z = double(a[t * HV + h]) + p.dt_bias[h];
      const double sp = z > 20 ? z : std::log(1 + std::exp(z));
      d.g.push_back(-std::exp(double(p.a_log[h])) * sp);
      d.beta.push_back(1 / (1 + std::exp(-double(b[t * HV + h]))));
    }
  }
  return d;
}

TEST(TokenPrepTest, MatchesDoublePrecision) {
  std::mt19937 rng(101);
  for (const char* name : {"tiny", "small"}) {
    const ModelConfig c = Preset(name);
    const LayerParams p = MakeLayerParams(c, 1);
    for (int32_t T : {1, 2, 3, 5, 17}) {
      auto act = RandomActivations(c, T, rng);
      auto win = RandomActivations(c, c.conv_width - 1, rng).qkv;  // a mid-sequence window
      PreparedTokens tok;
      PrepareTokens(c, p, win.data(), act.qkv.data(), act.a.data(), act.b.data(), T, &tok);
      const DoublePrep d = PrepareInDouble(c, p, win, act.qkv, act.a, act.b, T);
      ASSERT_EQ(tok.num_tokens, T);
      EXPECT_LE(RelativeError(tok.q.data(), d.q.data(), d.q.size()), 1e-6) << name << T;
      EXPECT_LE(RelativeError(tok.k.data(), d.k.data(), d.k.size()), 1e-6) << name << T;
      EXPECT_LE(RelativeError(tok.v.data(), d.v.data(), d.v.size()), 1e-6) << name << T;
      EXPECT_LE(RelativeError(tok.g.data(), d.g.data(), d.g.size()), 1e-6) << name << T;
      EXPECT_LE(RelativeError(tok.beta.data(), d.beta.data(), d.beta.size()), 1e-6) << name << T;
    }
  }
}

TEST(TokenPrepTest, NormalisedKeysHaveUnitNormAndGatesAreNegative) {
  std::mt19937 rng(102);
  const ModelConfig c = Preset("small");
  const LayerParams p = MakeLayerParams(c, 0);
  auto act = RandomActivations(c, 9, rng);
  std::vector<float> win((c.conv_width - 1) * c.channels(), 0.0f);
  PreparedTokens tok;
  PrepareTokens(c, p, win.data(), act.qkv.data(), act.a.data(), act.b.data(), 9, &tok);
  const int32_t K = c.head_k_dim;
  for (size_t r = 0; r < tok.k.size() / K; ++r) {
    double nk = 0, nq = 0;
    for (int32_t i = 0; i < K; ++i) {
      nk += double(tok.k[r * K + i]) * tok.k[r * K + i];
      nq += double(tok.q[r * K + i]) * tok.q[r * K + i];
    }
    EXPECT_NEAR(nk, 1.0, 1e-4);  // |k|^2 >> 1e-6 for random inputs
    EXPECT_NEAR(nq, 1.0 / K, 1e-4 / K);
  }
  for (float g : tok.g) EXPECT_LT(g, 0.0f);
  for (float bt : tok.beta) {
    EXPECT_GT(bt, 0.0f);
    EXPECT_LT(bt, 1.0f);
  }
}

TEST(TokenPrepTest, SoftplusIsLinearAbove20) {
  const ModelConfig c = Preset("tiny");
  const LayerParams p = MakeLayerParams(c, 0);
  std::mt19937 rng(103);
  auto act = RandomActivations(c, 1, rng);
  for (int32_t h = 0; h < c.num_v_heads; ++h) act.a[h] = 40.0f;
  std::vector<float> win((c.conv_width - 1) * c.channels(), 0.0f);
  PreparedTokens tok;
  PrepareTokens(c, p, win.data(), act.qkv.data(), act.a.data(), act.b.data(), 1, &tok);
  for (int32_t h = 0; h < c.num_v_heads; ++h) {
    const double want = -std::exp(double(p.a_log[h])) * (40.0 + p.dt_bias[h]);
    EXPECT_NEAR(tok.g[h], want, 1e-6 * std::fabs(want));
  }
}

TEST(TokenPrepTest, AdvanceConvWindowKeepsLastRows) {
  std::mt19937 rng(104);
  for (int32_t W : {1, 2, 4, 5}) {
    ModelConfig c = Preset("tiny");
    c.conv_width = W;
    const int32_t ch = c.channels();
    for (int32_t T = 1; T <= W + 2; ++T) {
      auto win = RandomActivations(c, W - 1, rng).qkv;
      auto act = RandomActivations(c, T, rng);
      std::vector<float> all(win);
      all.insert(all.end(), act.qkv.begin(), act.qkv.end());
      std::vector<float> want(all.end() - (W - 1) * ch, all.end());
      AdvanceConvWindow(c, win.data(), act.qkv.data(), T);
      EXPECT_EQ(win, want) << "W=" << W << " T=" << T;
    }
  }
}

TEST(TokenPrepTest, ChunkedPreparationEqualsOneCall) {
  // Preparing tokens in pieces with an advancing window gives the same results as one call.
  std::mt19937 rng(105);
  const ModelConfig c = Preset("tiny");
  const LayerParams p = MakeLayerParams(c, 0);
  const int32_t T = 11;
  auto act = RandomActivations(c, T, rng);
  std::vector<float> win0((c.conv_width - 1) * c.channels(), 0.0f);
  PreparedTokens all;
  PrepareTokens(c, p, win0.data(), act.qkv.data(), act.a.data(), act.b.data(), T, &all);
  std::vector<float> win(win0);
  int32_t t = 0;
  for (int32_t piece : {1, 2, 5, 3}) {
    PreparedTokens part;
    PrepareTokens(c, p, win.data(), act.qkv_at(c, t), act.a_at(c, t), act.b_at(c, t), piece, &part);
    const size_t hk = c.num_k_heads * c.head_k_dim;
    for (size_t i = 0; i < part.k.size(); ++i) ASSERT_EQ(part.k[i], all.k[t * hk + i]);
    for (size_t i = 0; i < part.q.size(); ++i) ASSERT_EQ(part.q[i], all.q[t * hk + i]);
    for (size_t i = 0; i < part.v.size(); ++i) ASSERT_EQ(part.v[i], all.v[t * c.out_elems() + i]);
    AdvanceConvWindow(c, win.data(), act.qkv_at(c, t), piece);
    t += piece;
  }
}

}  // namespace
}  // namespace kvbuffer
