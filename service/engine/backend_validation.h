// Argument checks every Backend runs before it touches storage, shared so that the CPU and CUDA
// backends refuse exactly the same calls with the same messages.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "kernels/reference/model_config.h"
#include "service/engine/backend.h"

namespace kvbuffer {

// OK if `layer` is in [0, L), else INVALID_ARGUMENT.
absl::Status ValidateLayer(const ModelConfig& config, int32_t layer);

// OK if pages [page_offset, +num_pages) lie in `page_table`, name valid pages, and hold
// `rows_needed` rows; else INVALID_ARGUMENT naming what[index].
absl::Status ValidatePageSpan(const PoolSizes& sizes, std::span<const int32_t> page_table,
                              int32_t page_offset, int32_t num_pages, int64_t rows_needed,
                              const char* what, size_t index);

// OK if a per-layer step is consistent (kind, dtypes, pointers, every item's tokens, slots, fold
// and chunk flags, pages for every row it reads or writes, the output row stride: 0, or at least
// a dense row when `takes_row_stride`); else INVALID_ARGUMENT.
absl::Status ValidateLayerStep(const ModelConfig& config, const PoolSizes& sizes,
                               const LayerStep& step, bool takes_row_stride = false);

// OK if standalone folds name valid state slots and pages; else INVALID_ARGUMENT.
absl::Status ValidateFoldItems(const ModelConfig& config, const PoolSizes& sizes, int32_t layer,
                               std::span<const FoldItem> items,
                               std::span<const int32_t> page_table);

// OK if conv commits name valid slots and 0 <= accepted <= drafts <= max_drafts.
absl::Status ValidateConvCommits(const ModelConfig& config, const PoolSizes& sizes, int32_t layer,
                                 std::span<const ConvCommitItem> items);

// OK if every conv slot is in range.
absl::Status ValidateConvSlots(const PoolSizes& sizes, std::span<const int32_t> conv_slots);

// OK if a state read names a valid slot and layer and has somewhere to write.
absl::Status ValidateStateRead(const ModelConfig& config, const PoolSizes& sizes,
                               int32_t state_slot, int32_t layer, const float* out);

}  // namespace kvbuffer
