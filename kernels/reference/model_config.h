// Shapes of a Gated DeltaNet model's linear-attention layers, and named presets.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvbuffer {

// Shapes of the linear-attention (Gated DeltaNet) layers the service serves.
struct ModelConfig {
  std::string name = "tiny";
  int32_t num_layers = 2;    // linear-attention layers served (L)
  int32_t num_k_heads = 2;   // key heads (H)
  int32_t num_v_heads = 4;   // value heads (HV), a multiple of H
  int32_t head_k_dim = 16;   // K
  int32_t head_v_dim = 16;   // V
  int32_t conv_width = 4;    // W
  uint64_t param_seed = 1;   // seed of the layer parameters when none are loaded

  // Channels of one token's qkv row: 2*H*K + HV*V.
  int32_t channels() const { return 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim; }
  // Value heads that share one key head (HV / H).
  int32_t group_size() const { return num_v_heads / num_k_heads; }
  // Floats in one layer's state: HV*K*V.
  int64_t state_elems() const {
    return static_cast<int64_t>(num_v_heads) * head_k_dim * head_v_dim;
  }
  // Floats in one token's output: HV*V.
  int32_t out_elems() const { return num_v_heads * head_v_dim; }

  bool operator==(const ModelConfig&) const = default;
};

// Returns the preset called `name` ("qwen3-next-80b-a3b", "small", "tiny"), or false if unknown.
bool ModelPreset(const std::string& name, ModelConfig* out);

// Names of all presets, for help texts and errors.
std::vector<std::string> ModelPresetNames();

// Returns an empty string if `c` is usable, else a message naming the bad field.
std::string ValidateModelConfig(const ModelConfig& c);

}  // namespace kvbuffer
