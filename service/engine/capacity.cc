#include "service/engine/capacity.h"

#include <algorithm>

namespace kvbuffer {

CapacityEstimate EstimateCapacity(const EngineOptions& options, const PoolElementBytes& bytes,
                                  int64_t length, int32_t drafts, const FreePools& free,
                                  int64_t budget_bytes) {
  const ModelConfig& m = options.model;
  CapacityEstimate e;
  e.length = std::max<int64_t>(0, length);
  e.drafts = std::max(0, drafts);
  const bool stateful = e.length + e.drafts > options.stateless_limit;
  const int64_t rows = stateful ? options.flush_interval : e.length + e.drafts;
  const int64_t pages = (rows + options.page_tokens - 1) / options.page_tokens;
  e.kvbuffer_bytes_per_sequence =
      bytes.conv_slot + (stateful ? bytes.state_slot : 0) + pages * bytes.buffer_page;
  const int64_t conv_window = static_cast<int64_t>(m.num_layers) * (m.conv_width - 1) *
                              m.channels() * static_cast<int64_t>(DTypeSize(options.conv_dtype));
  e.recurrent_bytes_per_sequence = (1 + e.drafts) * (bytes.state_slot + conv_window);
  int64_t fit = free.conv_slots;
  if (stateful) fit = std::min(fit, free.state_slots);
  if (pages > 0) fit = std::min(fit, free.buffer_pages / pages);
  e.max_sequences_now = std::max<int64_t>(0, fit);
  e.max_sequences_at_equal_memory = budget_bytes / std::max<int64_t>(1, e.kvbuffer_bytes_per_sequence);
  e.recurrent_sequences_at_equal_memory =
      budget_bytes / std::max<int64_t>(1, e.recurrent_bytes_per_sequence);
  e.ratio = static_cast<double>(e.recurrent_bytes_per_sequence) /
            static_cast<double>(std::max<int64_t>(1, e.kvbuffer_bytes_per_sequence));
  return e;
}

int64_t PoolBudgetBytes(const EngineOptions& options, const PoolElementBytes& bytes) {
  return bytes.state_slot * options.state_slots + bytes.buffer_page * options.buffer_pages +
         bytes.conv_slot * options.max_sequences;
}

}  // namespace kvbuffer
