// Capacity accounting: memory one sequence needs in the KVBuffer layout and in the recurrent
// layout, and how many sequences fit a budget.
#pragma once

#include <cstdint>

#include "service/engine/backend.h"
#include "service/engine/engine_options.h"

namespace kvbuffer {

// Memory one sequence needs in each layout, for capacity planning.
struct CapacityEstimate {
  int64_t length = 0;
  int32_t drafts = 0;
  int64_t kvbuffer_bytes_per_sequence = 0;
  int64_t recurrent_bytes_per_sequence = 0;  // (1 + drafts) x (state + conv window)
  int64_t max_sequences_now = 0;             // that fit in the free pools as configured
  int64_t max_sequences_at_equal_memory = 0;  // budget / kvbuffer bytes
  int64_t recurrent_sequences_at_equal_memory = 0;  // budget / recurrent bytes
  double ratio = 0;  // recurrent_bytes_per_sequence / kvbuffer_bytes_per_sequence
};

// Free pool elements, for max_sequences_now.
struct FreePools {
  int64_t conv_slots = 0;
  int64_t state_slots = 0;
  int64_t buffer_pages = 0;
};

// Estimates a sequence of `length` tokens verifying `drafts` drafts per step. A sequence holds a
// state once length + drafts exceeds the stateless limit and then never more than flush_interval
// buffer rows (the fold rule), rounded up to pages; it always holds one conv slot. The recurrent
// layout holds one state and one conv window per sequence plus one of each per draft.
CapacityEstimate EstimateCapacity(const EngineOptions& options, const PoolElementBytes& bytes,
                                  int64_t length, int32_t drafts, const FreePools& free,
                                  int64_t budget_bytes);

// Bytes of the pools as configured in `options` (states + pages + conv slots).
int64_t PoolBudgetBytes(const EngineOptions& options, const PoolElementBytes& bytes);

}  // namespace kvbuffer
