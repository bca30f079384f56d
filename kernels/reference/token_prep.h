// Per-token preparation of one layer's inputs: causal conv + SiLU, split, l2norm, scale, gates.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer {

// Prepared quantities of T tokens of one sequence on one layer (fp32, row-major).
struct PreparedTokens {
  int32_t num_tokens = 0;
  std::vector<float> q;     // [T][H][K]  q^ = q / sqrt(|q|^2 + 1e-6) * K^-1/2
  std::vector<float> k;     // [T][H][K]  k^ = k / sqrt(|k|^2 + 1e-6)
  std::vector<float> v;     // [T][HV][V]
  std::vector<float> g;     // [T][HV]    g = -exp(A_log) * softplus(a + dt_bias)
  std::vector<float> beta;  // [T][HV]    sigmoid(b)
};

// Prepares T tokens. `window` holds the W-1 raw qkv rows before the first token, oldest first
// ([W-1][channels], zeros at a sequence start); qkv is [T][channels]; a, b are [T][HV].
// Accumulates in double internally where it is cheap; results are fp32.
void PrepareTokens(const ModelConfig& config, const LayerParams& params, const float* window,
                   const float* qkv, const float* a, const float* b, int32_t num_tokens,
                   PreparedTokens* out);

// Advances a conv window ([W-1][channels], oldest first) past T raw rows qkv [T][channels].
void AdvanceConvWindow(const ModelConfig& config, float* window, const float* qkv,
                       int32_t num_tokens);

}  // namespace kvbuffer
