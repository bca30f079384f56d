#include "service/engine/tensor.h"

#include "absl/strings/str_join.h"

namespace kvbuffer {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return "[" + absl::StrJoin(shape, ", ") + "]";
}

}  // namespace kvbuffer
