// Byte sizes of pool elements: the single source of truth for capacity accounting.
#include "service/engine/backend.h"

namespace kvbuffer {

PoolElementBytes ComputePoolElementBytes(const ModelConfig& config, const PoolSizes& sizes) {
  const int64_t L = config.num_layers;
  const int64_t H = config.num_k_heads;
  const int64_t HV = config.num_v_heads;
  const int64_t K = config.head_k_dim;
  const int64_t V = config.head_v_dim;
  const int64_t W = config.conv_width;
  PoolElementBytes b;
  b.state_slot = L * HV * K * V * 4;
  b.buffer_row = (H * K + HV * V) * static_cast<int64_t>(DTypeSize(sizes.buffer_dtype)) + HV * 4;
  b.buffer_page = L * static_cast<int64_t>(sizes.page_tokens) * b.buffer_row;
  b.conv_slot = L * (W - 1 + sizes.max_drafts) * config.channels() *
                static_cast<int64_t>(DTypeSize(sizes.conv_dtype));
  return b;
}

}  // namespace kvbuffer
