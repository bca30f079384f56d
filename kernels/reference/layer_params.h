// Parameters of the linear-attention layers: conv weight, A_log and dt_bias.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/reference/model_config.h"

namespace kvbuffer {

// One layer's parameters, fp32, row-major.
struct LayerParams {
  std::vector<float> conv_weight;  // [channels][W]: weight of tap i for channel c at c*W + i
  std::vector<float> a_log;        // [HV]
  std::vector<float> dt_bias;      // [HV]
};

// Deterministic portable generator (splitmix64) so that every client can rebuild the same
// parameters from the seed: state = seed ^ ((layer + 1) * 0x9E3779B97F4A7C15).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  // Next 64 random bits.
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform double in [0, 1) from the top 53 bits of Next().
  double Uniform() { return static_cast<double>(Next() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  uint64_t state_;
};

// Draws layer `layer`'s parameters from config.param_seed, in this order: conv_weight
// (channel-major, (2u-1)/sqrt(W)), then per value head A_log = log(1 + 15u) and
// dt_bias = log(expm1(dt)) with dt = 0.001 * 100^u (Qwen3-Next's initialisation ranges).
LayerParams MakeLayerParams(const ModelConfig& config, int32_t layer);

// MakeLayerParams for every layer of `config`.
std::vector<LayerParams> MakeAllLayerParams(const ModelConfig& config);

}  // namespace kvbuffer
