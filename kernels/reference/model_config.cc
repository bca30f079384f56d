#include "kernels/reference/model_config.h"

namespace kvbuffer {

bool ModelPreset(const std::string& name, ModelConfig* out) {
  ModelConfig c;
  c.name = name;
  if (name == "qwen3-next-80b-a3b") {
    c.num_layers = 36;
    c.num_k_heads = 16;
    c.num_v_heads = 32;
    c.head_k_dim = 128;
    c.head_v_dim = 128;
    c.conv_width = 4;
  } else if (name == "small") {
    c.num_layers = 4;
    c.num_k_heads = 4;
    c.num_v_heads = 8;
    c.head_k_dim = 32;
    c.head_v_dim = 32;
    c.conv_width = 4;
  } else if (name == "tiny") {
    c.num_layers = 2;
    c.num_k_heads = 2;
    c.num_v_heads = 4;
    c.head_k_dim = 16;
    c.head_v_dim = 16;
    c.conv_width = 4;
  } else {
    return false;
  }
  *out = c;
  return true;
}

std::vector<std::string> ModelPresetNames() { return {"qwen3-next-80b-a3b", "small", "tiny"}; }

std::string ValidateModelConfig(const ModelConfig& c) {
  if (c.num_layers < 1) return "num_layers must be >= 1";
  if (c.num_k_heads < 1) return "num_k_heads must be >= 1";
  if (c.num_v_heads < c.num_k_heads || c.num_v_heads % c.num_k_heads != 0) {
    return "num_v_heads must be a positive multiple of num_k_heads";
  }
  if (c.head_k_dim < 1 || c.head_k_dim > 256) return "head_k_dim must be in [1, 256]";
  if (c.head_v_dim < 1 || c.head_v_dim > 256) return "head_v_dim must be in [1, 256]";
  if (c.conv_width < 1 || c.conv_width > 8) return "conv_width must be in [1, 8]";
  return "";
}

}  // namespace kvbuffer
