#include "client/cpp/tensor_builder.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvbuffer::client {

v1::DType ToProtoDType(DType d) {
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

absl::StatusOr<DType> FromProtoDType(v1::DType d) {
  switch (d) {
    case v1::FP32:
      return DType::kFloat32;
    case v1::FP16:
      return DType::kFloat16;
    case v1::BF16:
      return DType::kBFloat16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype ", static_cast<int>(d), " is not FP32, FP16 or BF16"));
  }
}

void SetTensor(absl::Span<const float> values, absl::Span<const int64_t> shape, DType dtype,
               v1::Tensor* out) {
  out->set_dtype(ToProtoDType(dtype));
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  std::string* data = out->mutable_data();
  data->resize(values.size() * DTypeSize(dtype));
  if (dtype == DType::kFloat32) {
    if (!values.empty()) std::memcpy(data->data(), values.data(), data->size());
    return;
  }
  for (size_t i = 0; i < values.size(); ++i) StoreFromFloat(data->data(), dtype, i, values[i]);
}

v1::Tensor MakeTensor(absl::Span<const float> values, absl::Span<const int64_t> shape,
                      DType dtype) {
  v1::Tensor t;
  SetTensor(values, shape, dtype, &t);
  return t;
}

void RoundToDType(absl::Span<float> values, DType dtype) {
  if (dtype == DType::kFloat32) return;
  for (float& v : values) {
    uint16_t bits = dtype == DType::kBFloat16 ? FloatToBF16(v) : FloatToFP16(v);
    v = dtype == DType::kBFloat16 ? BF16ToFloat(bits) : FP16ToFloat(bits);
  }
}

absl::Status TensorToFloats(const v1::Tensor& t, std::vector<float>* out) {
  absl::StatusOr<DType> dtype = FromProtoDType(t.dtype());
  if (!dtype.ok()) return dtype.status();
  size_t elements = 1;
  for (int64_t d : t.shape()) {
    if (d < 0) return absl::InvalidArgumentError("tensor has a negative dimension");
    elements *= static_cast<size_t>(d);
  }
  if (t.data().size() != elements * DTypeSize(*dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor data has ", t.data().size(), " bytes, expected ", elements * DTypeSize(*dtype)));
  }
  out->resize(elements);
  for (size_t i = 0; i < elements; ++i) (*out)[i] = LoadAsFloat(t.data().data(), *dtype, i);
  return absl::OkStatus();
}

}  // namespace kvbuffer::client
