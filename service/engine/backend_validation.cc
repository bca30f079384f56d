#include "service/engine/backend_validation.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvbuffer {
namespace {

bool ValidDType(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

}  // namespace

absl::Status ValidateLayer(const ModelConfig& config, int32_t layer) {
  if (layer < 0 || layer >= config.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", config.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status ValidatePageSpan(const PoolSizes& sizes, std::span<const int32_t> page_table,
                              int32_t page_offset, int32_t num_pages, int64_t rows_needed,
                              const char* what, size_t index) {
  if (page_offset < 0 || num_pages < 0 ||
      static_cast<int64_t>(page_offset) + num_pages > static_cast<int64_t>(page_table.size())) {
    return absl::InvalidArgumentError(absl::StrCat(what, "[", index, "]: pages [", page_offset,
                                                   ", +", num_pages, ") outside the page table of ",
                                                   page_table.size()));
  }
  if (rows_needed > static_cast<int64_t>(num_pages) * sizes.page_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(what, "[", index, "]: needs ", rows_needed,
                                                   " buffer rows but holds ", num_pages,
                                                   " pages of ", sizes.page_tokens));
  }
  for (int32_t p = 0; p < num_pages; ++p) {
    const int32_t page = page_table[page_offset + p];
    if (page < 0 || page >= sizes.buffer_pages) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, "[", index, "]: page ", page, " out of range [0, ", sizes.buffer_pages, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateLayerStep(const ModelConfig& config, const PoolSizes& sizes,
                               const LayerStep& step, bool takes_row_stride) {
  if (absl::Status s = ValidateLayer(config, step.layer); !s.ok()) return s;
  if (step.kind != StepKind::kDecode && step.kind != StepKind::kVerify &&
      step.kind != StepKind::kPrefill) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown step kind ", static_cast<int>(step.kind)));
  }
  if (!ValidDType(step.in_dtype) || !ValidDType(step.out_dtype)) {
    return absl::InvalidArgumentError("in_dtype and out_dtype must be FP32, FP16 or BF16");
  }
  if (step.total_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("total_tokens ", step.total_tokens, " < 0"));
  }
  if (!step.items.empty() &&
      (step.qkv == nullptr || step.a == nullptr || step.b == nullptr || step.out == nullptr)) {
    return absl::InvalidArgumentError("qkv, a, b and out must not be null");
  }
  if (step.out_row_stride != 0) {
    const size_t row = static_cast<size_t>(config.out_elems()) * DTypeSize(step.out_dtype);
    if (!takes_row_stride) {
      return absl::InvalidArgumentError(
          absl::StrCat("out_row_stride must be 0 for this backend, got ", step.out_row_stride));
    }
    if (step.out_row_stride < row || step.out_row_stride % DTypeSize(step.out_dtype) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("out_row_stride must be 0 or a multiple of ", DTypeSize(step.out_dtype),
                       " that is at least ", row, " bytes, got ", step.out_row_stride));
    }
  }
  for (size_t i = 0; i < step.items.size(); ++i) {
    const StepItem& it = step.items[i];
    auto bad = [i](auto&&... parts) {
      return absl::InvalidArgumentError(absl::StrCat("items[", i, "]: ", parts...));
    };
    if (it.num_tokens < 1) return bad("num_tokens ", it.num_tokens, " must be >= 1");
    if (it.token_offset < 0 ||
        static_cast<int64_t>(it.token_offset) + it.num_tokens > step.total_tokens) {
      return bad("tokens [", it.token_offset, ", +", it.num_tokens, ") outside total_tokens ",
                 step.total_tokens);
    }
    if (it.state_slot < -1 || it.state_slot >= sizes.state_slots) {
      return bad("state_slot ", it.state_slot, " out of range [-1, ", sizes.state_slots, ")");
    }
    if (it.conv_slot < 0 || it.conv_slot >= sizes.conv_slots) {
      return bad("conv_slot ", it.conv_slot, " out of range [0, ", sizes.conv_slots, ")");
    }
    if (it.buffer_rows < 0) return bad("buffer_rows ", it.buffer_rows, " < 0");
    if ((it.fold_first || it.state_is_new) && it.state_slot < 0) {
      return bad("fold_first/state_is_new need a state slot");
    }
    if (step.kind == StepKind::kVerify && it.num_tokens > sizes.max_drafts) {
      return bad(it.num_tokens, " drafts exceed max_drafts ", sizes.max_drafts);
    }
    int64_t rows_after = 0;
    if (it.chunked) {
      if (step.kind != StepKind::kPrefill) return bad("chunked is only valid for prefill");
      if (it.state_slot < 0) return bad("chunked needs a state slot");
      if (!it.fold_first && it.buffer_rows != 0) {
        return bad("chunked needs fold_first or an empty buffer, has ", it.buffer_rows, " rows");
      }
      if (it.fold_tokens < 0 || it.fold_tokens > it.num_tokens) {
        return bad("fold_tokens ", it.fold_tokens, " outside [0, ", it.num_tokens, "]");
      }
      rows_after = it.num_tokens - it.fold_tokens;
    } else {
      rows_after = (it.fold_first ? 0 : static_cast<int64_t>(it.buffer_rows)) + it.num_tokens;
    }
    const int64_t needed = std::max<int64_t>(it.buffer_rows, rows_after);
    if (absl::Status s = ValidatePageSpan(sizes, step.page_table, it.page_offset, it.num_pages,
                                          needed, "items", i);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateFoldItems(const ModelConfig& config, const PoolSizes& sizes, int32_t layer,
                               std::span<const FoldItem> items,
                               std::span<const int32_t> page_table) {
  if (absl::Status s = ValidateLayer(config, layer); !s.ok()) return s;
  for (size_t i = 0; i < items.size(); ++i) {
    const FoldItem& it = items[i];
    if (it.state_slot < 0 || it.state_slot >= sizes.state_slots) {
      return absl::InvalidArgumentError(absl::StrCat("fold items[", i, "]: state_slot ",
                                                     it.state_slot, " out of range [0, ",
                                                     sizes.state_slots, ")"));
    }
    if (it.buffer_rows < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("fold items[", i, "]: buffer_rows ", it.buffer_rows, " < 0"));
    }
    if (absl::Status s = ValidatePageSpan(sizes, page_table, it.page_offset, it.num_pages,
                                          it.buffer_rows, "fold items", i);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateConvCommits(const ModelConfig& config, const PoolSizes& sizes, int32_t layer,
                                 std::span<const ConvCommitItem> items) {
  if (absl::Status s = ValidateLayer(config, layer); !s.ok()) return s;
  for (size_t i = 0; i < items.size(); ++i) {
    const ConvCommitItem& it = items[i];
    if (it.conv_slot < 0 || it.conv_slot >= sizes.conv_slots) {
      return absl::InvalidArgumentError(absl::StrCat("commit items[", i, "]: conv_slot ",
                                                     it.conv_slot, " out of range [0, ",
                                                     sizes.conv_slots, ")"));
    }
    if (it.accepted < 0 || it.accepted > it.drafts || it.drafts > sizes.max_drafts) {
      return absl::InvalidArgumentError(absl::StrCat("commit items[", i, "]: need 0 <= accepted (",
                                                     it.accepted, ") <= drafts (", it.drafts,
                                                     ") <= max_drafts (", sizes.max_drafts, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateConvSlots(const PoolSizes& sizes, std::span<const int32_t> conv_slots) {
  for (size_t i = 0; i < conv_slots.size(); ++i) {
    if (conv_slots[i] < 0 || conv_slots[i] >= sizes.conv_slots) {
      return absl::InvalidArgumentError(absl::StrCat("conv_slots[", i, "] = ", conv_slots[i],
                                                     " out of range [0, ", sizes.conv_slots, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateStateRead(const ModelConfig& config, const PoolSizes& sizes,
                               int32_t state_slot, int32_t layer, const float* out) {
  if (absl::Status s = ValidateLayer(config, layer); !s.ok()) return s;
  if (state_slot < 0 || state_slot >= sizes.state_slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("state_slot ", state_slot, " out of range [0, ", sizes.state_slots, ")"));
  }
  if (out == nullptr) return absl::InvalidArgumentError("ReadState: out is null");
  return absl::OkStatus();
}

}  // namespace kvbuffer
