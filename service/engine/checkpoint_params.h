// Reads the linear-attention layer parameters (conv weight, A_log, dt_bias) from a checkpoint's
// safetensors files, e.g. Qwen3-Next's model.layers.N.linear_attn.{conv1d.weight,A_log,dt_bias}.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer {

// Loads the parameters of every linear-attention layer found in `path` (one .safetensors file, or
// a directory whose *.safetensors files are all read). A layer is linear when its
// "<prefix>.layers.<i>.linear_attn.A_log" tensor exists; layers are taken in increasing i and
// must number config.num_layers. Shapes are checked against `config` (conv weight [channels, 1, W]
// or [channels, W]); F32, F16 and BF16 tensors are converted to fp32. Errors name the file and
// the tensor.
absl::StatusOr<std::vector<LayerParams>> LoadCheckpointParams(const std::string& path,
                                                             const ModelConfig& config);

}  // namespace kvbuffer
