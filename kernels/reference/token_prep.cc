#include "kernels/reference/token_prep.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace kvbuffer {
namespace {

// softplus with the usual linear cut-off above 20.
double Softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

// Normalises `n` values of `x` by 1/sqrt(|x|^2 + 1e-6) times `scale`, writing fp32 to `dst`.
void L2NormalizeInto(const double* x, int32_t n, double scale, float* dst) {
  double ss = 0.0;
  for (int32_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const double f = scale / std::sqrt(ss + 1e-6);
  for (int32_t i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i] * f);
}

}  // namespace

void PrepareTokens(const ModelConfig& config, const LayerParams& params, const float* window,
                   const float* qkv, const float* a, const float* b, int32_t num_tokens,
                   PreparedTokens* out) {
  const int32_t H = config.num_k_heads;
  const int32_t HV = config.num_v_heads;
  const int32_t K = config.head_k_dim;
  const int32_t V = config.head_v_dim;
  const int32_t W = config.conv_width;
  const int32_t ch = config.channels();
  const size_t T = static_cast<size_t>(std::max(num_tokens, 0));
  out->num_tokens = static_cast<int32_t>(T);
  out->q.resize(T * H * K);
  out->k.resize(T * H * K);
  out->v.resize(T * HV * V);
  out->g.resize(T * HV);
  out->beta.resize(T * HV);

  thread_local std::vector<double> x;
  x.resize(ch);
  const double q_scale = 1.0 / std::sqrt(static_cast<double>(K));
  const float* w = params.conv_weight.data();
  for (size_t t = 0; t < T; ++t) {
    // Causal depthwise conv: tap i reads row t - W + 1 + i of (window ++ qkv).
    std::fill(x.begin(), x.end(), 0.0);
    for (int32_t i = 0; i < W; ++i) {
      const int64_t idx = static_cast<int64_t>(t) + i - (W - 1);
      const float* row = idx < 0 ? window + (W - 1 + idx) * ch : qkv + idx * ch;
      for (int32_t c = 0; c < ch; ++c) {
        x[c] += static_cast<double>(w[static_cast<size_t>(c) * W + i]) * row[c];
      }
    }
    for (int32_t c = 0; c < ch; ++c) x[c] = x[c] / (1.0 + std::exp(-x[c]));  // SiLU
    for (int32_t h = 0; h < H; ++h) {
      L2NormalizeInto(x.data() + h * K, K, q_scale, out->q.data() + (t * H + h) * K);
      L2NormalizeInto(x.data() + H * K + h * K, K, 1.0, out->k.data() + (t * H + h) * K);
    }
    const double* xv = x.data() + 2 * H * K;
    float* v = out->v.data() + t * HV * V;
    for (int32_t i = 0; i < HV * V; ++i) v[i] = static_cast<float>(xv[i]);
    for (int32_t h = 0; h < HV; ++h) {
      const size_t i = t * HV + h;
      const double sp = Softplus(static_cast<double>(a[i]) + params.dt_bias[h]);
      out->g[i] = static_cast<float>(-std::exp(static_cast<double>(params.a_log[h])) * sp);
      out->beta[i] = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(b[i]))));
    }
  }
}

void AdvanceConvWindow(const ModelConfig& config, float* window, const float* qkv,
                       int32_t num_tokens) {
  const int32_t rows = config.conv_width - 1;
  const size_t ch = static_cast<size_t>(config.channels());
  if (rows <= 0 || num_tokens <= 0) return;
  if (num_tokens >= rows) {
    std::memcpy(window, qkv + (num_tokens - rows) * ch, rows * ch * sizeof(float));
    return;
  }
  const int32_t keep = rows - num_tokens;
  std::memmove(window, window + num_tokens * ch, keep * ch * sizeof(float));
  std::memcpy(window + keep * ch, qkv, num_tokens * ch * sizeof(float));
}

}  // namespace kvbuffer
