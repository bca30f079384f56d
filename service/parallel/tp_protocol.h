// The wire format between the ranks of a tensor-parallel group (same binary on every rank).
//
// Every command is, in rounds over the transport:
//   A. broadcast of a command block: CommandHeader, then the metadata (step items and page table,
//      fold items, conv items or conv slots) when it fits the first TpOptions::command_bytes (the
//      part every rank copies to its host), then every rank's inputs when those fit the block too
//      ("inline": one round for the call). The block's size is agreed in advance: command_bytes
//      at first, then what the previous command's header announced (next_block_bytes), so that
//      rank 0 can size it for the steps it is sending (a decode step's inputs inline);
//   B. (when not inline) one group of point-to-point transfers from rank 0: the metadata to
//      every rank, then each rank's inputs: its activation slice, or its parameter slice for
//      kAllocate;
//   C. a gather to rank 0 of each rank's RankStatus followed by its output payload (its output
//      heads of a step, its heads of a state for kReadState).
// kShutdown has round A only. All sizes follow from the header, so every rank posts matching
// receives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"
#include "service/engine/backend.h"

namespace kvbuffer::parallel {

// Alignment of every region inside transport buffers (kernels may use vector loads).
inline constexpr size_t kTpAlign = 256;

// Rounds `bytes` up to kTpAlign.
constexpr size_t TpAlign(size_t bytes) { return (bytes + kTpAlign - 1) / kTpAlign * kTpAlign; }

// Commands rank 0 sends.
enum class TpOp : uint32_t {
  kNoop = 0,        // heartbeat: round A and C only (refreshes every rank's memory figures)
  kAllocate = 1,    // model and pool sizes in the header, parameter slices as inputs
  kStep = 2,        // Backend::RunLayerStep
  kFold = 3,        // Backend::FoldBuffers
  kCommitConv = 4,  // Backend::CommitConv
  kResetConv = 5,   // Backend::ResetConv
  kReadState = 6,   // Backend::ReadState
  kShutdown = 7,    // ranks > 0 leave their loop; no round C
};

// Returns "step", "fold", ... for messages.
const char* TpOpName(TpOp op);

// Fixed-size head of every command block.
struct CommandHeader {
  uint32_t magic = 0;
  uint32_t layout = 0;  // kTpLayout: protocol version and struct sizes (same binary everywhere)
  uint64_t sequence = 0;
  uint32_t op = 0;
  int32_t layer = 0;
  int32_t kind = 0;       // StepKind
  int32_t in_dtype = 0;   // DType
  int32_t out_dtype = 0;  // DType
  int32_t total_tokens = 0;
  int32_t num_items = 0;       // step/fold/commit items or conv slots
  int32_t page_table_len = 0;  // entries after the items (step, fold)
  int32_t state_slot = 0;      // kReadState
  uint32_t meta_inline = 0;    // the metadata follows the header in the block
  uint32_t inputs_inline = 0;  // every rank's inputs follow the metadata in the block
  int32_t reserved = 0;
  int64_t meta_bytes = 0;        // items then page table, unpadded
  int64_t input_bytes = 0;       // per rank, padded (0: none)
  int64_t output_bytes = 0;      // per rank payload after its RankStatus, padded (0: none)
  int64_t next_block_bytes = 0;  // size of the next command's block (round A broadcast)
  // kAllocate: the full model (each rank derives its shard) and the pool sizes.
  int32_t model[8] = {};  // L, H, HV, K, V, W
  uint64_t param_seed = 0;
  char model_name[32] = {};
  int32_t pools[8] = {};  // state_slots, buffer_pages, page_tokens, conv_slots, max_drafts,
                          // buffer_dtype, conv_dtype
  uint8_t padding[56] = {};
};
static_assert(sizeof(CommandHeader) == 256, "CommandHeader is part of the wire format");

// What every rank reports in round C.
struct RankStatus {
  int32_t code = 0;  // absl::StatusCode
  int32_t rank = 0;
  uint64_t sequence = 0;
  int64_t pool_bytes = 0;
  int64_t device_total_bytes = 0;
  int64_t device_free_bytes = 0;
  char message[216] = {};
};
static_assert(sizeof(RankStatus) == 256, "RankStatus is part of the wire format");

inline constexpr uint32_t kTpMagic = 0x5054564bu;  // "KVTP"
// Changes whenever a wire struct changes, so that ranks of different builds refuse each other.
inline constexpr uint32_t kTpLayout =
    (2u << 24) | (sizeof(StepItem) << 16) | (sizeof(FoldItem) << 8) | sizeof(ConvCommitItem);

// Largest command block a header may announce (a rank refuses a larger one as malformed).
inline constexpr int64_t kMaxTpBlockBytes = int64_t{1} << 30;

// Where a step's inputs live inside one rank's input region (byte offsets; total is padded).
struct StepInputLayout {
  size_t qkv = 0, a = 0, b = 0, total = 0;
};

// Input layout of a shard with `shard` config for `tokens` tokens of `dtype`.
StepInputLayout ComputeStepInputLayout(const ModelConfig& shard, int64_t tokens, DType dtype);

// Bytes of a shard's step outputs for `tokens` tokens of `dtype`, padded.
size_t StepOutputBytes(const ModelConfig& shard, int64_t tokens, DType dtype);

// Bytes of a shard's parameters of every layer (conv weight rows, A_log, dt_bias), padded.
size_t ParamBytes(const ModelConfig& shard);

// Serialises a shard's parameters into `dst` (ParamBytes bytes).
void PackParams(const ModelConfig& shard, const std::vector<LayerParams>& params, void* dst);

// Rebuilds a shard's parameters from PackParams' bytes.
std::vector<LayerParams> UnpackParams(const ModelConfig& shard, const void* src);

// Offset of the metadata inside the command block.
inline constexpr size_t kMetaOffset = sizeof(CommandHeader);
// Offset of rank r's inline inputs inside the command block.
inline size_t InlineInputOffset(const CommandHeader& h, int32_t r) {
  return TpAlign(kMetaOffset + static_cast<size_t>(h.meta_bytes)) +
         static_cast<size_t>(r) * static_cast<size_t>(h.input_bytes);
}

// Block bytes a command needs for its metadata inline.
inline size_t BlockBytesWithMeta(const CommandHeader& h) {
  return kMetaOffset + static_cast<size_t>(h.meta_bytes);
}
// Block bytes a command needs for its metadata and every rank's inputs inline.
inline size_t BlockBytesWithInputs(const CommandHeader& h, int32_t world) {
  return InlineInputOffset(h, world);
}

// Bytes of one rank's slot in the round-C gather: its RankStatus then its payload.
inline size_t GatherSlotBytes(const CommandHeader& h) {
  return sizeof(RankStatus) + static_cast<size_t>(h.output_bytes);
}

// Writes the model and pool sizes into an allocate header.
void PutModel(const ModelConfig& config, const PoolSizes& sizes, CommandHeader* h);
// Reads the model and pool sizes back from an allocate header.
void GetModel(const CommandHeader& h, ModelConfig* config, PoolSizes* sizes);

// Checks magic and layout (INTERNAL naming what differs).
absl::Status CheckHeader(const CommandHeader& h);

// Bytes of a step's metadata: its items then its page table.
size_t StepMetaBytes(size_t items, size_t pages);
// Writes a step's metadata into `dst` (StepMetaBytes bytes).
void PackStepMeta(std::span<const StepItem> items, std::span<const int32_t> pages, void* dst);
// Bytes of a fold's metadata: its fold items then its page table.
size_t FoldMetaBytes(size_t items, size_t pages);
// Writes a fold's metadata into `dst` (FoldMetaBytes bytes).
void PackFoldMeta(std::span<const FoldItem> items, std::span<const int32_t> pages, void* dst);

// Views of received metadata (copied into aligned vectors).
struct DecodedMeta {
  std::vector<StepItem> step_items;
  std::vector<FoldItem> fold_items;
  std::vector<ConvCommitItem> conv_items;
  std::vector<int32_t> ints;  // page table (step, fold) or conv slots (reset)
};

// Decodes the metadata of `h` from `src` (h.meta_bytes bytes) into `out`, reusing its capacity;
// INTERNAL if the sizes do not add up.
absl::Status DecodeMeta(const CommandHeader& h, const void* src, DecodedMeta* out);

// Fills a RankStatus.
void PutStatus(const absl::Status& s, int32_t rank, uint64_t sequence, const BackendMemory& m,
               RankStatus* out);

// The absl::Status a RankStatus carries.
absl::Status GetStatus(const RankStatus& s);

}  // namespace kvbuffer::parallel
