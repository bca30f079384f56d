#include "kernels/reference/buffered_step.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvbuffer {
namespace {

// Dot product of two fp32 vectors of length n, accumulated in double.
double Dot(const float* x, const float* y, int32_t n) {
  double s = 0.0;
  for (int32_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * y[i];
  return s;
}

}  // namespace

void BufferedStep(const ModelConfig& config, const float* S, const BufferRows& buffer,
                  const PreparedTokens& tok, float* out, float* new_u, float* new_G) {
  const int32_t H = config.num_k_heads;
  const int32_t HV = config.num_v_heads;
  const int32_t K = config.head_k_dim;
  const int32_t V = config.head_v_dim;
  const int32_t grp = config.group_size();
  const int32_t m = tok.num_tokens;
  const int32_t n = buffer.n;
  if (m <= 0) return;

  // Per-head scratch, reused across calls on this thread.
  thread_local std::vector<double> G, p, y, u, o;
  G.resize(m);
  p.resize(static_cast<size_t>(m) * V);
  y.resize(static_cast<size_t>(m) * V);
  u.resize(static_cast<size_t>(m) * V);
  o.resize(static_cast<size_t>(m) * V);

  for (int32_t h = 0; h < HV; ++h) {
    const int32_t kh = h / grp;
    // Cumulative gates of the new rows relative to the checkpoint.
    double acc = n > 0 ? static_cast<double>(buffer.G[static_cast<size_t>(n - 1) * HV + h]) : 0.0;
    for (int32_t i = 0; i < m; ++i) {
      acc += tok.g[static_cast<size_t>(i) * HV + h];
      G[i] = acc;
      new_G[static_cast<size_t>(i) * HV + h] = static_cast<float>(acc);
    }
    auto qi = [&](int32_t i) { return tok.q.data() + (static_cast<size_t>(i) * H + kh) * K; };
    auto ki = [&](int32_t i) { return tok.k.data() + (static_cast<size_t>(i) * H + kh) * K; };

    // One pass over the checkpoint: p_i = S^T q^_i, r_i = S^T k^_i (r kept in y).
    std::fill(p.begin(), p.end(), 0.0);
    std::fill(y.begin(), y.end(), 0.0);
    if (S != nullptr) {
      const float* Sh = S + static_cast<size_t>(h) * K * V;
      for (int32_t kk = 0; kk < K; ++kk) {
        const float* row = Sh + static_cast<size_t>(kk) * V;
        for (int32_t i = 0; i < m; ++i) {
          const double qv = qi(i)[kk];
          const double kv = ki(i)[kk];
          double* pi = p.data() + static_cast<size_t>(i) * V;
          double* ri = y.data() + static_cast<size_t>(i) * V;
          for (int32_t v = 0; v < V; ++v) {
            pi[v] += qv * row[v];
            ri[v] += kv * row[v];
          }
        }
      }
    }
    // Decay the checkpoint terms and add the buffer rows.
    for (int32_t i = 0; i < m; ++i) {
      const double e = std::exp(G[i]);
      double* yi = y.data() + static_cast<size_t>(i) * V;
      double* oi = o.data() + static_cast<size_t>(i) * V;
      const double* pi = p.data() + static_cast<size_t>(i) * V;
      for (int32_t v = 0; v < V; ++v) {
        yi[v] *= e;
        oi[v] = e * pi[v];
      }
      for (int32_t j = 0; j < n; ++j) {
        const float* kj = buffer.k + (static_cast<size_t>(j) * H + kh) * K;
        const float* uj = buffer.u + (static_cast<size_t>(j) * HV + h) * V;
        const double decay = std::exp(G[i] - buffer.G[static_cast<size_t>(j) * HV + h]);
        const double ck = decay * Dot(kj, ki(i), K);
        const double cq = decay * Dot(kj, qi(i), K);
        for (int32_t v = 0; v < V; ++v) {
          yi[v] += ck * uj[v];
          oi[v] += cq * uj[v];
        }
      }
    }
    // Forward substitution over the new rows (strictly lower-triangular in u, diagonal in o).
    for (int32_t i = 0; i < m; ++i) {
      double* yi = y.data() + static_cast<size_t>(i) * V;
      double* oi = o.data() + static_cast<size_t>(i) * V;
      double* ui = u.data() + static_cast<size_t>(i) * V;
      for (int32_t l = 0; l < i; ++l) {
        const double ck = std::exp(G[i] - G[l]) * Dot(ki(l), ki(i), K);
        const double* ul = u.data() + static_cast<size_t>(l) * V;
        for (int32_t v = 0; v < V; ++v) yi[v] += ck * ul[v];
      }
      const double beta = tok.beta[static_cast<size_t>(i) * HV + h];
      const float* vi = tok.v.data() + (static_cast<size_t>(i) * HV + h) * V;
      for (int32_t v = 0; v < V; ++v) ui[v] = beta * (vi[v] - yi[v]);
      for (int32_t l = 0; l <= i; ++l) {
        const double cq = std::exp(G[i] - G[l]) * Dot(ki(l), qi(i), K);
        const double* ul = u.data() + static_cast<size_t>(l) * V;
        for (int32_t v = 0; v < V; ++v) oi[v] += cq * ul[v];
      }
      float* out_i = out + (static_cast<size_t>(i) * HV + h) * V;
      float* new_u_i = new_u + (static_cast<size_t>(i) * HV + h) * V;
      for (int32_t v = 0; v < V; ++v) {
        out_i[v] = static_cast<float>(oi[v]);
        new_u_i[v] = static_cast<float>(ui[v]);
      }
    }
  }
}

}  // namespace kvbuffer
