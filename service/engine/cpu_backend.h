// CpuBackend: the exact reference Backend on host memory, built on kernels/reference.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/reference/buffered_step.h"
#include "kernels/reference/token_prep.h"
#include "service/engine/backend.h"

namespace kvbuffer {

// Host-memory Backend. Storage: states fp32 [slot][L][HV][K][V]; pages [page][L][page_tokens]
// rows of k^ [H*K] and u [HV*V] in buffer_dtype followed by G [HV] fp32; conv slots
// [slot][L][W-1+max_drafts][channels] in conv_dtype (W-1 committed window rows, oldest first,
// then the raw rows of pending drafts). Not thread-safe: the engine serialises calls.
class CpuBackend : public Backend {
 public:
  CpuBackend() = default;
  ~CpuBackend() override = default;

  // Returns "cpu".
  std::string Name() const override { return "cpu"; }

  // Validates config, params and sizes, then allocates zeroed pools (RESOURCE_EXHAUSTED if the
  // host cannot hold them).
  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override;

  // Validates every item, then runs them in order (see Backend::RunLayerStep).
  absl::Status RunLayerStep(const LayerStep& step) override;

  // Validates every item, then folds each buffer into its state on `layer`.
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override;

  // Validates every item, then makes each window the last W-1 rows of window ++ accepted drafts.
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override;

  // Zeroes every layer of the given conv slots.
  absl::Status ResetConv(std::span<const int32_t> conv_slots) override;

  // Copies one layer of a state slot to out [HV][K][V].
  absl::Status ReadState(int32_t state_slot, int32_t layer, float* out) override;

  // Bytes of the three pools; device fields are zero.
  BackendMemory Memory() const override;

 private:
  // Where a sequence's buffer rows live: its slice of the call's page table.
  struct PageSpan {
    std::span<const int32_t> pages;
  };

  absl::Status CheckAllocated() const;
  float* StateLayer(int32_t slot, int32_t layer);
  uint8_t* ConvLayer(int32_t slot, int32_t layer);
  uint8_t* RowAddress(const PageSpan& span, int32_t layer, int32_t row);
  // Reads n rows into rows_k_/rows_u_/rows_G_ (fp32) and returns a view of them.
  BufferRows GatherRows(const PageSpan& span, int32_t layer, int32_t n);
  // Writes one row (rounding k and u to buffer_dtype).
  void StoreRow(const PageSpan& span, int32_t layer, int32_t row, const float* k, const float* u,
                const float* G);
  void LoadWindow(int32_t conv_slot, int32_t layer);
  void StoreConvRows(int32_t conv_slot, int32_t layer, int32_t first_row, const float* rows,
                     int32_t n);

  bool allocated_ = false;
  ModelConfig config_;
  std::vector<LayerParams> params_;
  PoolSizes sizes_;
  PoolElementBytes bytes_;
  int64_t conv_rows_ = 0;  // W-1+max_drafts

  std::vector<float> states_;
  std::vector<uint8_t> pages_;
  std::vector<uint8_t> conv_;

  // Scratch reused across calls.
  std::vector<float> qkv_, a_, b_, out_, window_, rows_k_, rows_u_, rows_G_, new_u_, new_G_;
  PreparedTokens tok_;
};

}  // namespace kvbuffer
