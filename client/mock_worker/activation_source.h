// Seeded random activations of a Gated DeltaNet layer, as a model worker would send them.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/reference/dtype.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer::mock {

// One sequence's activations for some tokens on one layer, already rounded to the wire dtype (so
// they are exactly the values the server receives): qkv [T][channels], a and b [T][HV].
struct Activations {
  int32_t tokens = 0;
  std::vector<float> qkv;
  std::vector<float> a;
  std::vector<float> b;
};

class ActivationSource {
 public:
  // Draws from `seed`; values are rounded to `wire_dtype`.
  ActivationSource(const ModelConfig& config, DType wire_dtype, uint64_t seed);

  // Fills `out` with `tokens` tokens: qkv uniform in [-1, 1), a in [-1, 1), b in [-2, 2).
  void Generate(int32_t tokens, Activations* out);

  // A uniform integer in [lo, hi].
  int64_t UniformInt(int64_t lo, int64_t hi);

  // A uniform double in [0, 1).
  double Uniform() { return rng_.Uniform(); }

 private:
  ModelConfig config_;
  DType wire_dtype_;
  SplitMix64 rng_;
};

}  // namespace kvbuffer::mock
