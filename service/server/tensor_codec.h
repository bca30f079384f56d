// The one place where wire tensors (kvbuffer.v1.Tensor) and engine tensors meet. Decoding borrows
// the message's bytes (no copy); encoding moves the engine's bytes into the message (no copy).
#pragma once

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/reference/dtype.h"
#include "kvbuffer/v1/attention_service.pb.h"
#include "service/engine/tensor.h"

namespace kvbuffer::server {

// The engine dtype of wire dtype `d`; INVALID_ARGUMENT naming `field` if unspecified or unknown.
absl::StatusOr<DType> DTypeFromProto(v1::DType d, absl::string_view field);

// The wire dtype of engine dtype `d`.
v1::DType DTypeToProto(DType d);

// Most dimensions a wire tensor may have (every tensor of the API has 2 or 3).
inline constexpr int kMaxTensorRank = 8;

// Sets `out` to a view of `t` borrowing its bytes (reusing out's shape storage); INVALID_ARGUMENT
// naming `field` when the dtype is missing, the shape has more than kMaxTensorRank dimensions, a
// dimension is negative, or the data size differs from what shape and dtype require.
absl::Status TensorViewFromProto(const v1::Tensor& t, absl::string_view field, TensorView* out);

// Moves `t` (dtype, shape and bytes) into `out`.
void TensorToProto(Tensor&& t, v1::Tensor* out);

}  // namespace kvbuffer::server
