// Tensors as the engine sees them: dtype + shape + raw little-endian row-major bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/reference/dtype.h"

namespace kvbuffer {

// A borrowed tensor (the bytes belong to the caller, e.g. a protobuf message).
struct TensorView {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t size_bytes = 0;
};

// An owned tensor.
struct Tensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::string bytes;

  // Borrowed view of this tensor.
  TensorView view() const { return {dtype, shape, bytes.data(), bytes.size()}; }
};

// "[a, b, c]" for error messages.
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace kvbuffer
