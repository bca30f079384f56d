#include "service/engine/activation_check.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "service/engine/activation_scan.h"

namespace kvbuffer {

uint32_t ActivationLimitBits(DType dtype) {
  if (dtype == DType::kFloat32) return uint32_t{127 + kActivationMagnitudeLog2} << 23;
  if (dtype == DType::kBFloat16) return uint32_t{127 + kActivationMagnitudeLog2} << 7;
  return 0x7c00;  // FP16: Inf and NaN
}

absl::Status CheckActivationValues(const char* name, DType dtype, const void* data, size_t n,
                                   void* copy_to) {
  const uint32_t limit = ActivationLimitBits(dtype);
  const size_t bad = copy_to == nullptr
                         ? FindFirstMagnitudeAtLeast(data, n, dtype, limit)
                         : CopyAndFindFirstMagnitudeAtLeast(data, copy_to, n, dtype, limit);
  if (bad >= n) return absl::OkStatus();
  const float v = LoadAsFloat(data, dtype, bad);
  if (!std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " holds a non-finite value (", v, ") at element ", bad));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      name, " holds ", v, " at element ", bad, "; activations must have |x| < 2^",
      kActivationMagnitudeLog2, " (", static_cast<int64_t>(kMaxActivationMagnitude), ")"));
}

}  // namespace kvbuffer
