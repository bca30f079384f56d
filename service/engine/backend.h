// The Backend interface: device storage for states, buffer pages and conv windows, and the batched
// per-layer operations on them. The engine owns all bookkeeping (which slot, page or row belongs to
// which sequence); a backend only computes. Implementations: CpuBackend (exact reference, always
// built) and CudaBackend (kernels/cuda). No gRPC or CUDA types appear here.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/reference/dtype.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer {

// Sizes of the pools a backend allocates once, up front.
struct PoolSizes {
  int32_t state_slots = 0;   // each holds one sequence's fp32 state for every layer: L*HV*K*V
  int32_t buffer_pages = 0;  // each holds page_tokens buffer rows for every layer
  int32_t page_tokens = 16;  // rows per page
  int32_t conv_slots = 0;    // each holds one sequence's conv window (+ draft rows) for every layer
  int32_t max_drafts = 16;   // draft rows a conv slot keeps beside its W-1 window rows
  DType buffer_dtype = DType::kFloat32;  // element type of buffered k^ and u (G is always fp32)
  DType conv_dtype = DType::kFloat32;    // element type of stored raw qkv rows
};

// Bytes each pool element occupies; the single source of truth for capacity accounting.
struct PoolElementBytes {
  int64_t state_slot = 0;
  int64_t buffer_page = 0;
  int64_t buffer_row = 0;  // one row of one layer: H*K + HV*V elements + HV fp32
  int64_t conv_slot = 0;
};

// Computes PoolElementBytes for `config` and `sizes` (page_tokens, max_drafts, dtypes).
PoolElementBytes ComputePoolElementBytes(const ModelConfig& config, const PoolSizes& sizes);

// What a per-layer step does with its tokens.
enum class StepKind : uint8_t {
  kDecode = 0,   // committed tokens appended to the buffer (one per sequence on the wire)
  kVerify = 1,   // tentative draft rows; conv window not advanced, draft raw rows kept
  kPrefill = 2,  // committed tokens; may fold through the chunked (UT) path
};

// One sequence's part of a per-layer step. Row r of a sequence's buffer lives in page
// page_table[page_offset + r / page_tokens] at row r % page_tokens.
struct StepItem {
  int32_t token_offset = 0;   // first row of this item in the call's activations and outputs
  int32_t num_tokens = 0;     // tokens of this item (>= 1)
  int32_t state_slot = -1;    // -1: the sequence has no state (p = r = 0)
  bool state_is_new = false;  // slot allocated by this call: its contents are undefined, use zero
  bool fold_first = false;    // fold all buffer_rows into the state before the tokens
  int32_t buffer_rows = 0;    // committed rows in the buffer before the call
  // Chunked path (prefill only; requires fold_first or buffer_rows == 0, and state_slot >= 0):
  // the first fold_tokens tokens are folded into the state with the UT form (chunks of 64); the
  // remaining num_tokens - fold_tokens become buffer rows 0.. relative to the new checkpoint.
  bool chunked = false;
  int32_t fold_tokens = 0;
  int32_t conv_slot = 0;
  int32_t page_offset = 0;  // into LayerStep::page_table
  int32_t num_pages = 0;    // pages the sequence holds (enough for every row after the call)
};

// A batched per-layer call. Activations are host memory, row-major, tokens of all items
// concatenated: qkv [total_tokens][channels], a and b [total_tokens][HV]; out receives
// [total_tokens][HV][V] in out_dtype.
struct LayerStep {
  int32_t layer = 0;
  StepKind kind = StepKind::kDecode;
  std::span<const StepItem> items;
  std::span<const int32_t> page_table;
  DType in_dtype = DType::kFloat32;
  const void* qkv = nullptr;
  const void* a = nullptr;
  const void* b = nullptr;
  int32_t total_tokens = 0;
  DType out_dtype = DType::kFloat32;
  void* out = nullptr;
  // Bytes from one token's output row to the next in `out`; 0 means dense (HV * V elements).
  // Only backends whose TakesOutputRowStride() is true accept a non-zero stride.
  size_t out_row_stride = 0;
};

// Folds a sequence's buffer into its state on one layer (a standalone flush).
struct FoldItem {
  int32_t state_slot = 0;
  bool state_is_new = false;
  int32_t buffer_rows = 0;
  int32_t page_offset = 0;
  int32_t num_pages = 0;
};

// Keeps the first `accepted` of `drafts` tentative rows in a conv window on one layer.
struct ConvCommitItem {
  int32_t conv_slot = 0;
  int32_t accepted = 0;
  int32_t drafts = 0;
};

// Memory a backend holds.
struct BackendMemory {
  int64_t pool_bytes = 0;          // states + pages + conv slots
  int64_t device_total_bytes = 0;  // card memory (0 on the CPU backend)
  int64_t device_free_bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // Short name: "cpu" or "cuda".
  virtual std::string Name() const = 0;

  // Allocates the pools and uploads the layer parameters; called once before anything else.
  virtual absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                                const PoolSizes& sizes) = 0;

  // Runs one batched per-layer step: optional folds, token preparation (conv, SiLU, l2norm,
  // gates), the buffered or chunked computation, outputs, new buffer rows and conv updates.
  // Items never share a state slot, page or conv slot. Returns INTERNAL on device failure.
  virtual absl::Status RunLayerStep(const LayerStep& step) = 0;

  // Folds buffers into states on `layer` (standalone flush); buffers count as empty afterwards.
  virtual absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                                   std::span<const int32_t> page_table) = 0;

  // Applies draft acceptance to conv windows on `layer`.
  virtual absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) = 0;

  // Zeroes the conv windows (all layers) of newly opened sequences.
  virtual absl::Status ResetConv(std::span<const int32_t> conv_slots) = 0;

  // Copies one layer of a state slot to host fp32 [HV][K][V] (tests and snapshots).
  virtual absl::Status ReadState(int32_t state_slot, int32_t layer, float* out) = 0;

  // Memory the backend holds and, for a device, what the card has.
  virtual BackendMemory Memory() const = 0;

  // Host memory that this backend writes step outputs into (and reads activations from) fastest,
  // e.g. page-locked memory that a GPU copies to without a bounce buffer; nullptr (the default)
  // where plain memory is as good. The engine keeps its output buffers there. May be called
  // while another thread is inside a call of this backend.
  virtual void* AllocateHostBuffer(size_t /*bytes*/) { return nullptr; }

  // Frees memory from AllocateHostBuffer (no call may be using it).
  virtual void FreeHostBuffer(void* /*p*/) {}

  // True if activations in AllocateHostBuffer memory save this backend a copy of its own; the
  // engine then copies them there while it checks them (qkv, a and b at 256-byte aligned offsets
  // of one buffer). Default false.
  virtual bool PrefersHostBufferInputs() const { return false; }

  // True if RunLayerStep itself refuses activation values outside the rule of activation_check.h
  // with the engine's INVALID_ARGUMENT message (the first refused element of qkv, then a, then
  // b) and changes nothing then; the engine skips its own scan of the values (its shape checks
  // stay). Such a backend checks while it copies the values anyway (e.g. per shard, in parallel).
  // Default false.
  virtual bool ChecksActivationValues() const { return false; }

  // True if RunLayerStep writes output rows LayerStep::out_row_stride bytes apart. Default false:
  // a non-zero stride is INVALID_ARGUMENT.
  virtual bool TakesOutputRowStride() const { return false; }
};

// Creates the exact CPU backend.
std::unique_ptr<Backend> MakeCpuBackend();

}  // namespace kvbuffer
