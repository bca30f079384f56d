// Model configurations read from a file (--config): either key=value lines or a JSON object,
// including a Hugging Face config.json of a Gated DeltaNet model (Qwen3-Next).
//
// key=value form, one setting a line, '#' starts a comment:
//   preset = small           # optional: start from a preset, then override
//   name = my-model
//   num_layers = 36          # linear-attention layers served (L)
//   num_k_heads = 16         # H
//   num_v_heads = 32         # HV, a multiple of H
//   head_k_dim = 128         # K
//   head_v_dim = 128         # V
//   conv_width = 4           # W
//   param_seed = 1           # seed of the layer parameters
// JSON form: the same keys as members of one object, or Hugging Face names:
//   linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim,
//   linear_conv_kernel_dim, and num_hidden_layers with full_attention_interval (every interval-th
//   layer is full attention, the rest are linear: L = n - n / interval); model_type names it.
// Unknown keys are an error in the key=value form and ignored in JSON (so a whole config.json
// can be given).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer::server {

// Parses a model config in either form; `origin` names the source in errors. The result is
// validated (ValidateModelConfig).
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view text, absl::string_view origin);

// Reads and parses the file at `path`.
absl::StatusOr<ModelConfig> LoadModelConfigFile(const std::string& path);

}  // namespace kvbuffer::server
