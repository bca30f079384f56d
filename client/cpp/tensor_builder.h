// Wire tensors from float arrays and back, in FP32, FP16 or BF16 (round to nearest even).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/reference/dtype.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::client {

// The wire dtype of `d`.
v1::DType ToProtoDType(DType d);

// The dtype of wire dtype `d`; INVALID_ARGUMENT if unspecified or unknown.
absl::StatusOr<DType> FromProtoDType(v1::DType d);

// Sets `out` to `values` converted to `dtype` with shape `shape` (whose product must be
// values.size()); reuses out's storage.
void SetTensor(absl::Span<const float> values, absl::Span<const int64_t> shape, DType dtype,
               v1::Tensor* out);

// A new tensor holding `values` as `dtype` with shape `shape`.
v1::Tensor MakeTensor(absl::Span<const float> values, absl::Span<const int64_t> shape, DType dtype);

// Rounds `values` in place to the nearest `dtype` values: what a server receives from SetTensor.
void RoundToDType(absl::Span<float> values, DType dtype);

// Reads `t` as floats into `out`; INVALID_ARGUMENT if its dtype is unknown or its data size does
// not match its shape.
absl::Status TensorToFloats(const v1::Tensor& t, std::vector<float>* out);

}  // namespace kvbuffer::client
