#include "kernels/reference/gdn_oracle.h"

#include <cmath>
#include <limits>

namespace kvbuffer {

OracleSequence::OracleSequence(const ModelConfig& config, const std::vector<LayerParams>* params)
    : config_(config), params_(params) {
  const int32_t L = config.num_layers;
  states_.assign(L, std::vector<double>(static_cast<size_t>(config.state_elems()), 0.0));
  windows_.assign(
      L, std::vector<double>(static_cast<size_t>(config.conv_width - 1) * config.channels(), 0.0));
  positions_.assign(L, 0);
}

std::vector<double> OracleSequence::Append(int32_t layer, const float* qkv, const float* a,
                                           const float* b, int32_t num_tokens) {
  const int32_t H = config_.num_k_heads;
  const int32_t HV = config_.num_v_heads;
  const int32_t K = config_.head_k_dim;
  const int32_t V = config_.head_v_dim;
  const int32_t W = config_.conv_width;
  const int32_t ch = config_.channels();
  const int32_t grp = config_.group_size();
  const LayerParams& p = (*params_)[layer];
  std::vector<double>& S = states_[layer];
  std::vector<double>& win = windows_[layer];
  std::vector<double> out(static_cast<size_t>(num_tokens) * HV * V);
  std::vector<double> x(ch), q(static_cast<size_t>(H) * K), k(static_cast<size_t>(H) * K);
  std::vector<double> y(V);

  for (int32_t t = 0; t < num_tokens; ++t) {
    const float* row = qkv + static_cast<size_t>(t) * ch;
    // Causal depthwise conv over the W-1 window rows and this token, then SiLU.
    for (int32_t c = 0; c < ch; ++c) {
      double s = static_cast<double>(p.conv_weight[static_cast<size_t>(c) * W + W - 1]) * row[c];
      for (int32_t i = 0; i < W - 1; ++i) {
        s += static_cast<double>(p.conv_weight[static_cast<size_t>(c) * W + i]) *
             win[static_cast<size_t>(i) * ch + c];
      }
      x[c] = s / (1.0 + std::exp(-s));
    }
    if (W > 1) {
      for (int32_t i = 0; i + 1 < W - 1; ++i) {
        for (int32_t c = 0; c < ch; ++c) {
          win[static_cast<size_t>(i) * ch + c] = win[static_cast<size_t>(i + 1) * ch + c];
        }
      }
      for (int32_t c = 0; c < ch; ++c) win[static_cast<size_t>(W - 2) * ch + c] = row[c];
    }
    // Split and normalise q and k per key head.
    for (int32_t h = 0; h < H; ++h) {
      double sq = 0.0, sk = 0.0;
      for (int32_t d = 0; d < K; ++d) {
        sq += x[h * K + d] * x[h * K + d];
        sk += x[H * K + h * K + d] * x[H * K + h * K + d];
      }
      const double fq = 1.0 / std::sqrt(sq + 1e-6) / std::sqrt(static_cast<double>(K));
      const double fk = 1.0 / std::sqrt(sk + 1e-6);
      for (int32_t d = 0; d < K; ++d) {
        q[h * K + d] = x[h * K + d] * fq;
        k[h * K + d] = x[H * K + h * K + d] * fk;
      }
    }
    // Recurrence per value head.
    for (int32_t h = 0; h < HV; ++h) {
      const int32_t kh = h / grp;
      const size_t ti = static_cast<size_t>(t) * HV + h;
      const double z = static_cast<double>(a[ti]) + p.dt_bias[h];
      const double sp = z > 20.0 ? z : std::log1p(std::exp(z));
      const double g = -std::exp(static_cast<double>(p.a_log[h])) * sp;
      const double beta = 1.0 / (1.0 + std::exp(-static_cast<double>(b[ti])));
      const double decay = std::exp(g);
      double* Sh = S.data() + static_cast<size_t>(h) * K * V;
      const double* kv = k.data() + static_cast<size_t>(kh) * K;
      const double* qv = q.data() + static_cast<size_t>(kh) * K;
      const double* vv = x.data() + 2 * H * K + static_cast<size_t>(h) * V;
      for (size_t i = 0; i < static_cast<size_t>(K) * V; ++i) Sh[i] *= decay;
      for (int32_t v = 0; v < V; ++v) y[v] = 0.0;
      for (int32_t d = 0; d < K; ++d) {
        for (int32_t v = 0; v < V; ++v) y[v] += kv[d] * Sh[static_cast<size_t>(d) * V + v];
      }
      for (int32_t v = 0; v < V; ++v) y[v] = beta * (vv[v] - y[v]);  // u
      for (int32_t d = 0; d < K; ++d) {
        for (int32_t v = 0; v < V; ++v) Sh[static_cast<size_t>(d) * V + v] += kv[d] * y[v];
      }
      double* o = out.data() + ti * V;
      for (int32_t v = 0; v < V; ++v) o[v] = 0.0;
      for (int32_t d = 0; d < K; ++d) {
        for (int32_t v = 0; v < V; ++v) o[v] += qv[d] * Sh[static_cast<size_t>(d) * V + v];
      }
    }
  }
  positions_[layer] += num_tokens;
  return out;
}

double RelativeError(const float* got, const double* want, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(got[i])) return std::numeric_limits<double>::infinity();
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  if (den == 0.0) return num == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num) / std::sqrt(den);
}

}  // namespace kvbuffer
