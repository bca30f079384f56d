// fp64 recurrent oracle of the full Gated DeltaNet layer (DESIGN §2, first block): the truth every
// kernel and backend is checked against.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer {

// One sequence on every layer: fp64 states and raw conv windows, advanced token by token.
// Copyable, so a caller can evaluate drafts on a copy and append only the accepted ones.
class OracleSequence {
 public:
  OracleSequence(const ModelConfig& config, const std::vector<LayerParams>* params);

  // Appends T tokens on `layer` (qkv [T][channels], a, b [T][HV] as the float values the service
  // received) and returns the outputs [T][HV][V].
  std::vector<double> Append(int32_t layer, const float* qkv, const float* a, const float* b,
                             int32_t num_tokens);

  // Tokens appended so far on `layer`.
  int64_t position(int32_t layer) const { return positions_[layer]; }

  // State of `layer` ([HV][K][V]).
  const std::vector<double>& state(int32_t layer) const { return states_[layer]; }

 private:
  ModelConfig config_;
  const std::vector<LayerParams>* params_;
  std::vector<std::vector<double>> states_;   // [L][HV*K*V]
  std::vector<std::vector<double>> windows_;  // [L][(W-1)*channels], oldest first
  std::vector<int64_t> positions_;
};

// ||got - want|| / ||want|| over n values (want in fp64); NaN in got gives +inf.
double RelativeError(const float* got, const double* want, size_t n);

}  // namespace kvbuffer
