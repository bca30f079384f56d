// The rule for activation values (finite, |x| < 2^kActivationMagnitudeLog2) and its
// INVALID_ARGUMENT message, shared by the engine and by backends that check values themselves
// while they copy them (ShardedBackend and TpBackend with per-shard checks).
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/reference/dtype.h"

namespace kvbuffer {

// Activations (qkv, a, b) must be finite and of magnitude below 2^kActivationMagnitudeLog2;
// others are INVALID_ARGUMENT naming the field, the element and the bound. The bound keeps every
// fp32 intermediate (conv, L2 norms, state, outputs) far from overflow and is orders of magnitude
// above any real projection output; every FP16 value is below it.
inline constexpr int kActivationMagnitudeLog2 = 20;
inline constexpr float kMaxActivationMagnitude = 1048576.0f;  // 2^20
static_assert(kMaxActivationMagnitude == float(1 << kActivationMagnitudeLog2));
static_assert(kActivationMagnitudeLog2 > 16 && kActivationMagnitudeLog2 < 127);

// Returns the limit on an element's bits without the sign for `dtype`: an element is refused when
// they are >= the limit (|x| >= 2^k, Inf and NaN included; FP16 only Inf and NaN).
uint32_t ActivationLimitBits(DType dtype);

// OK if each of the `n` elements of `dtype` at `data` is allowed; else INVALID_ARGUMENT naming
// `name`, the first refused element's index and its value. With `copy_to`, also copies the
// elements there in the same pass (the copy is incomplete after a refusal).
absl::Status CheckActivationValues(const char* name, DType dtype, const void* data, size_t n,
                                   void* copy_to);

}  // namespace kvbuffer
