#include "kernels/reference/buffer_fold.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvbuffer {

void FoldBuffer(const ModelConfig& config, float* S, bool state_is_zero, const BufferRows& buffer) {
  const int32_t H = config.num_k_heads;
  const int32_t HV = config.num_v_heads;
  const int32_t K = config.head_k_dim;
  const int32_t V = config.head_v_dim;
  const int32_t grp = config.group_size();
  const int32_t n = buffer.n;
  if (n <= 0) {
    if (state_is_zero) std::fill(S, S + config.state_elems(), 0.0f);
    return;
  }
  thread_local std::vector<double> coef, row;
  coef.resize(n);
  row.resize(V);
  for (int32_t h = 0; h < HV; ++h) {
    const int32_t kh = h / grp;
    const double Gn = buffer.G[static_cast<size_t>(n - 1) * HV + h];
    const double decay = std::exp(Gn);
    for (int32_t j = 0; j < n; ++j) {
      coef[j] = std::exp(Gn - buffer.G[static_cast<size_t>(j) * HV + h]);
    }
    float* Sh = S + static_cast<size_t>(h) * K * V;
    for (int32_t kk = 0; kk < K; ++kk) {
      float* Srow = Sh + static_cast<size_t>(kk) * V;
      if (state_is_zero) {
        std::fill(row.begin(), row.end(), 0.0);
      } else {
        for (int32_t v = 0; v < V; ++v) row[v] = decay * Srow[v];
      }
      for (int32_t j = 0; j < n; ++j) {
        const double c = coef[j] * buffer.k[(static_cast<size_t>(j) * H + kh) * K + kk];
        const float* uj = buffer.u + (static_cast<size_t>(j) * HV + h) * V;
        for (int32_t v = 0; v < V; ++v) row[v] += c * uj[v];
      }
      for (int32_t v = 0; v < V; ++v) Srow[v] = static_cast<float>(row[v]);
    }
  }
}

}  // namespace kvbuffer
