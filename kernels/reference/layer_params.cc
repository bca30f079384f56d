#include "kernels/reference/layer_params.h"

#include <cmath>

namespace kvbuffer {

LayerParams MakeLayerParams(const ModelConfig& config, int32_t layer) {
  SplitMix64 rng(config.param_seed ^ ((static_cast<uint64_t>(layer) + 1) * 0x9E3779B97F4A7C15ull));
  LayerParams p;
  const int32_t channels = config.channels();
  const int32_t w = config.conv_width;
  const double scale = 1.0 / std::sqrt(static_cast<double>(w));
  p.conv_weight.resize(static_cast<size_t>(channels) * w);
  for (auto& x : p.conv_weight) x = static_cast<float>((2.0 * rng.Uniform() - 1.0) * scale);
  p.a_log.resize(config.num_v_heads);
  p.dt_bias.resize(config.num_v_heads);
  for (int32_t h = 0; h < config.num_v_heads; ++h) {
    p.a_log[h] = static_cast<float>(std::log(1.0 + 15.0 * rng.Uniform()));
    const double dt = 0.001 * std::pow(100.0, rng.Uniform());
    p.dt_bias[h] = static_cast<float>(std::log(std::expm1(dt)));
  }
  return p;
}

std::vector<LayerParams> MakeAllLayerParams(const ModelConfig& config) {
  std::vector<LayerParams> all;
  all.reserve(config.num_layers);
  for (int32_t l = 0; l < config.num_layers; ++l) all.push_back(MakeLayerParams(config, l));
  return all;
}

}  // namespace kvbuffer
