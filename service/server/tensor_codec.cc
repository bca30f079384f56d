#include "service/server/tensor_codec.h"

#include <cstdint>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvbuffer::server {

absl::StatusOr<DType> DTypeFromProto(v1::DType d, absl::string_view field) {
  switch (d) {
    case v1::FP32:
      return DType::kFloat32;
    case v1::FP16:
      return DType::kFloat16;
    case v1::BF16:
      return DType::kBFloat16;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " is DTYPE_UNSPECIFIED, expected FP32, FP16 or BF16"));
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          field, " has unknown value ", static_cast<int>(d), ", expected FP32, FP16 or BF16"));
  }
}

v1::DType DTypeToProto(DType d) {
  switch (d) {
    case DType::kFloat32:
      return v1::FP32;
    case DType::kFloat16:
      return v1::FP16;
    case DType::kBFloat16:
      return v1::BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::Status TensorViewFromProto(const v1::Tensor& t, absl::string_view field, TensorView* out) {
  if (t.dtype() != v1::FP32 && t.dtype() != v1::FP16 && t.dtype() != v1::BF16) {
    return DTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype")).status();
  }
  const DType dtype = *DTypeFromProto(t.dtype(), field);
  if (t.shape_size() > kMaxTensorRank) {
    // Checked first, so that no message below prints an unbounded shape.
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".shape has ", t.shape_size(), " dimensions, expected at most ", kMaxTensorRank));
  }
  out->dtype = dtype;
  out->shape.assign(t.shape().begin(), t.shape().end());
  // Element count with overflow protection: anything above int64 max bytes cannot match anyway.
  constexpr uint64_t kMaxElements = std::numeric_limits<int64_t>::max() / 4;
  uint64_t elements = 1;
  bool overflow = false;
  for (int i = 0; i < t.shape_size(); ++i) {
    const int64_t dim = t.shape(i);
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape[", i, "] is ", dim,
                                                     ", expected >= 0 (shape ",
                                                     ShapeString(out->shape), ")"));
    }
    if (dim != 0 && elements > kMaxElements / static_cast<uint64_t>(dim)) overflow = true;
    elements = overflow ? kMaxElements : elements * static_cast<uint64_t>(dim);
  }
  const uint64_t expected = elements * DTypeSize(dtype);
  if (overflow || t.data().size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".data has ", t.data().size(), " bytes, expected ",
                     overflow ? std::string("more than 2^63") : absl::StrCat(expected),
                     " for shape ", ShapeString(out->shape), " ", std::string(DTypeName(dtype))));
  }
  out->data = t.data().data();
  out->size_bytes = t.data().size();
  return absl::OkStatus();
}

void TensorToProto(Tensor&& t, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(t.dtype));
  out->mutable_shape()->Assign(t.shape.begin(), t.shape.end());
  out->set_data(std::move(t.bytes));
}

}  // namespace kvbuffer::server
