#include "service/parallel/head_shard.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvbuffer::parallel {

absl::Status ValidateShardCount(const ModelConfig& config, int32_t count) {
  if (count < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor-parallel size ", count, " must be >= 1"));
  }
  if (config.num_k_heads < 1 || config.num_k_heads % count != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor-parallel size ", count, " must divide the key heads (H=", config.num_k_heads,
        "): shards own whole key-head groups"));
  }
  if (config.num_v_heads % config.num_k_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("value heads (HV=", config.num_v_heads,
                     ") must be a multiple of key heads (H=", config.num_k_heads, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<HeadShard> MakeHeadShard(const ModelConfig& config, int32_t index, int32_t count) {
  if (absl::Status s = ValidateShardCount(config, count); !s.ok()) return s;
  if (index < 0 || index >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", index, " out of range [0, ", count, ")"));
  }
  HeadShard s;
  s.index = index;
  s.count = count;
  s.num_k_heads = config.num_k_heads / count;
  s.num_v_heads = config.num_v_heads / count;
  s.k_head_begin = index * s.num_k_heads;
  s.v_head_begin = index * s.num_v_heads;
  return s;
}

absl::StatusOr<std::vector<HeadShard>> MakeHeadShards(const ModelConfig& config, int32_t count) {
  if (absl::Status s = ValidateShardCount(config, count); !s.ok()) return s;
  std::vector<HeadShard> shards;
  shards.reserve(count);
  for (int32_t i = 0; i < count; ++i) shards.push_back(*MakeHeadShard(config, i, count));
  return shards;
}

ModelConfig ShardModelConfig(const ModelConfig& config, const HeadShard& shard) {
  ModelConfig c = config;
  c.num_k_heads = shard.num_k_heads;
  c.num_v_heads = shard.num_v_heads;
  return c;
}

std::array<ChannelRun, 3> ShardChannelRuns(const ModelConfig& config, const HeadShard& shard) {
  const int32_t K = config.head_k_dim;
  const int32_t V = config.head_v_dim;
  const int32_t hk = config.num_k_heads * K;  // width of the full q (and k) block
  const int32_t qk_len = shard.num_k_heads * K;
  return {ChannelRun{shard.k_head_begin * K, 0, qk_len},
          ChannelRun{hk + shard.k_head_begin * K, qk_len, qk_len},
          ChannelRun{2 * hk + shard.v_head_begin * V, 2 * qk_len, shard.num_v_heads * V}};
}

LayerParams ShardLayerParams(const ModelConfig& config, const HeadShard& shard,
                             const LayerParams& full) {
  const int32_t W = config.conv_width;
  LayerParams p;
  const auto runs = ShardChannelRuns(config, shard);
  p.conv_weight.resize(static_cast<size_t>(runs[2].dst + runs[2].len) * W);
  for (const ChannelRun& r : runs) {
    std::memcpy(p.conv_weight.data() + static_cast<size_t>(r.dst) * W,
                full.conv_weight.data() + static_cast<size_t>(r.src) * W,
                static_cast<size_t>(r.len) * W * sizeof(float));
  }
  p.a_log.assign(full.a_log.begin() + shard.v_head_begin,
                 full.a_log.begin() + shard.v_head_begin + shard.num_v_heads);
  p.dt_bias.assign(full.dt_bias.begin() + shard.v_head_begin,
                   full.dt_bias.begin() + shard.v_head_begin + shard.num_v_heads);
  return p;
}

std::vector<LayerParams> ShardAllLayerParams(const ModelConfig& config, const HeadShard& shard,
                                             const std::vector<LayerParams>& full) {
  std::vector<LayerParams> out;
  out.reserve(full.size());
  for (const LayerParams& p : full) out.push_back(ShardLayerParams(config, shard, p));
  return out;
}

void CopyRows(const void* src, size_t src_stride, void* dst, size_t dst_stride, int64_t rows,
              size_t row_bytes) {
  const uint8_t* s = static_cast<const uint8_t*>(src);
  uint8_t* d = static_cast<uint8_t*>(dst);
  if (src_stride == row_bytes && dst_stride == row_bytes) {
    std::memcpy(d, s, static_cast<size_t>(rows) * row_bytes);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(d + static_cast<size_t>(r) * dst_stride, s + static_cast<size_t>(r) * src_stride,
                row_bytes);
  }
}

void SliceActivations(const ModelConfig& config, const HeadShard& shard, size_t elem_bytes,
                      int64_t tokens, const void* qkv, const void* a, const void* b,
                      void* shard_qkv, void* shard_a, void* shard_b) {
  if (tokens <= 0) return;
  const auto runs = ShardChannelRuns(config, shard);
  const size_t full_row = static_cast<size_t>(config.channels()) * elem_bytes;
  const size_t shard_row = static_cast<size_t>(runs[2].dst + runs[2].len) * elem_bytes;
  const uint8_t* src = static_cast<const uint8_t*>(qkv);
  uint8_t* dst = static_cast<uint8_t*>(shard_qkv);
  // Row-major over tokens so that each token's source row is read while it is in cache.
  for (int64_t t = 0; t < tokens; ++t) {
    const uint8_t* s = src + static_cast<size_t>(t) * full_row;
    uint8_t* d = dst + static_cast<size_t>(t) * shard_row;
    for (const ChannelRun& r : runs) {
      std::memcpy(d + r.dst * elem_bytes, s + r.src * elem_bytes, r.len * elem_bytes);
    }
  }
  const size_t full_heads = static_cast<size_t>(config.num_v_heads) * elem_bytes;
  const size_t shard_heads = static_cast<size_t>(shard.num_v_heads) * elem_bytes;
  const size_t first = static_cast<size_t>(shard.v_head_begin) * elem_bytes;
  CopyRows(static_cast<const uint8_t*>(a) + first, full_heads, shard_a, shard_heads, tokens,
           shard_heads);
  CopyRows(static_cast<const uint8_t*>(b) + first, full_heads, shard_b, shard_heads, tokens,
           shard_heads);
}

void PlaceShardOutputs(const ModelConfig& config, const HeadShard& shard, size_t elem_bytes,
                       int64_t tokens, const void* shard_out, void* out) {
  if (tokens <= 0) return;
  const size_t V = static_cast<size_t>(config.head_v_dim);
  const size_t full_row = static_cast<size_t>(config.num_v_heads) * V * elem_bytes;
  const size_t shard_row = static_cast<size_t>(shard.num_v_heads) * V * elem_bytes;
  const size_t first = static_cast<size_t>(shard.v_head_begin) * V * elem_bytes;
  CopyRows(shard_out, shard_row, static_cast<uint8_t*>(out) + first, full_row, tokens, shard_row);
}

int64_t ShardStateOffset(const ModelConfig& config, const HeadShard& shard) {
  return static_cast<int64_t>(shard.v_head_begin) * config.head_k_dim * config.head_v_dim;
}

}  // namespace kvbuffer::parallel
