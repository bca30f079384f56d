// Tensor-parallel slicing by key-head groups: which heads, channels and parameters one shard of N
// owns, and the copies between a call's full activations/outputs/states and a shard's slice.
//
// Shard s of N owns key heads [s*H/N, (s+1)*H/N) and their value heads [s*HV/N, (s+1)*HV/N)
// (value head h belongs to key head h / (HV/H), so a key-head group's value heads are contiguous).
// A shard's qkv row is its own q | k | v channels in that order: q and k K channels per key head,
// v V channels per value head. Everything per head is independent (DESIGN §2), so a shard run on
// its slice computes bit for bit what the full model computes for those heads.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer::parallel {

// The heads one shard owns.
struct HeadShard {
  int32_t index = 0;         // s
  int32_t count = 1;         // N
  int32_t k_head_begin = 0;  // first key head
  int32_t num_k_heads = 0;   // H / N
  int32_t v_head_begin = 0;  // first value head
  int32_t num_v_heads = 0;   // HV / N

  bool operator==(const HeadShard&) const = default;
};

// A contiguous run of qkv channels: `len` channels from `src` in the full row go to `dst` in the
// shard's row.
struct ChannelRun {
  int32_t src = 0;
  int32_t dst = 0;
  int32_t len = 0;
};

// OK if `config` can be split into `count` shards (count >= 1 and H % count == 0), else
// INVALID_ARGUMENT naming both numbers.
absl::Status ValidateShardCount(const ModelConfig& config, int32_t count);

// Returns shard `index` of `count` (INVALID_ARGUMENT if the count does not divide H or the index
// is out of range).
absl::StatusOr<HeadShard> MakeHeadShard(const ModelConfig& config, int32_t index, int32_t count);

// Returns all `count` shards of `config` in order (INVALID_ARGUMENT as MakeHeadShard).
absl::StatusOr<std::vector<HeadShard>> MakeHeadShards(const ModelConfig& config, int32_t count);

// Returns the model a shard's backend serves: `config` with H/N key heads and HV/N value heads.
ModelConfig ShardModelConfig(const ModelConfig& config, const HeadShard& shard);

// Returns the shard's q, k and v channel runs (in this order) within a full qkv row.
std::array<ChannelRun, 3> ShardChannelRuns(const ModelConfig& config, const HeadShard& shard);

// Returns the shard's parameters: conv weight rows of its channels (shard channel order), and
// A_log and dt_bias of its value heads.
LayerParams ShardLayerParams(const ModelConfig& config, const HeadShard& shard,
                             const LayerParams& full);

// ShardLayerParams for every layer.
std::vector<LayerParams> ShardAllLayerParams(const ModelConfig& config, const HeadShard& shard,
                                             const std::vector<LayerParams>& full);

// Copies the shard's part of `tokens` rows of activations, elements of `elem_bytes` bytes:
// qkv [T][channels] -> shard_qkv [T][shard channels]; a, b [T][HV] -> shard_a, shard_b [T][HV/N].
void SliceActivations(const ModelConfig& config, const HeadShard& shard, size_t elem_bytes,
                      int64_t tokens, const void* qkv, const void* a, const void* b,
                      void* shard_qkv, void* shard_a, void* shard_b);

// Writes a shard's outputs [T][HV/N][V] into its value heads of out [T][HV][V] (elements of
// `elem_bytes` bytes); the other heads of out are left as they are.
void PlaceShardOutputs(const ModelConfig& config, const HeadShard& shard, size_t elem_bytes,
                       int64_t tokens, const void* shard_out, void* out);

// Element offset of a shard's value heads within one layer of a state [HV][K][V]: a shard's
// [HV/N][K][V] block is contiguous there.
int64_t ShardStateOffset(const ModelConfig& config, const HeadShard& shard);

// Copies `rows` rows of `row_bytes` bytes between strided buffers (strides in bytes).
void CopyRows(const void* src, size_t src_stride, void* dst, size_t dst_stride, int64_t rows,
              size_t row_bytes);

}  // namespace kvbuffer::parallel
