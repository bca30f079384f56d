// Head-shard geometry: ranges, channel runs, parameter slices, activation and output copies.
#include "service/parallel/head_shard.h"

#include <cstring>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "service/engine/backend.h"

namespace kvbuffer::parallel {
namespace {

ModelConfig Preset(const char* name) {
  ModelConfig c;
  EXPECT_TRUE(ModelPreset(name, &c));
  return c;
}

TEST(HeadShardTest, CountMustDivideKeyHeads) {
  const ModelConfig c = Preset("small");  // H = 4
  EXPECT_TRUE(ValidateShardCount(c, 1).ok());
  EXPECT_TRUE(ValidateShardCount(c, 2).ok());
  EXPECT_TRUE(ValidateShardCount(c, 4).ok());
  for (int32_t n : {0, 3, 8, -1}) {
    absl::Status s = ValidateShardCount(c, n);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << n;
  }
  EXPECT_NE(ValidateShardCount(c, 3).message().find("H=4"), std::string::npos);
  EXPECT_EQ(MakeHeadShard(c, 2, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeHeadShard(c, -1, 2).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HeadShardTest, ShardsTileTheHeadsInOrder) {
  const ModelConfig c = Preset("qwen3-next-80b-a3b");  // H = 16, HV = 32
  for (int32_t n : {1, 2, 4, 8, 16}) {
    auto shards = MakeHeadShards(c, n);
    ASSERT_TRUE(shards.ok()) << shards.status();
    int32_t k = 0, v = 0;
    for (const HeadShard& s : *shards) {
      EXPECT_EQ(s.k_head_begin, k);
      EXPECT_EQ(s.v_head_begin, v);
      // Every value head of the shard belongs to one of its key heads.
      EXPECT_EQ(s.v_head_begin / c.group_size(), s.k_head_begin);
      EXPECT_EQ((s.v_head_begin + s.num_v_heads - 1) / c.group_size(),
                s.k_head_begin + s.num_k_heads - 1);
      k += s.num_k_heads;
      v += s.num_v_heads;
      const ModelConfig sc = ShardModelConfig(c, s);
      EXPECT_TRUE(ValidateModelConfig(sc).empty());
      EXPECT_EQ(sc.group_size(), c.group_size());
    }
    EXPECT_EQ(k, c.num_k_heads);
    EXPECT_EQ(v, c.num_v_heads);
  }
}

TEST(HeadShardTest, ChannelRunsCoverEveryChannelOnce) {
  const ModelConfig c = Preset("small");
  for (int32_t n : {1, 2, 4}) {
    std::vector<int32_t> owner(c.channels(), -1);
    auto shards = MakeHeadShards(c, n);
    ASSERT_TRUE(shards.ok());
    for (const HeadShard& s : *shards) {
      const auto runs = ShardChannelRuns(c, s);
      EXPECT_EQ(runs[0].dst, 0);
      EXPECT_EQ(runs[1].dst, runs[0].len);
      EXPECT_EQ(runs[2].dst, runs[0].len + runs[1].len);
      EXPECT_EQ(runs[2].dst + runs[2].len, ShardModelConfig(c, s).channels());
      for (const ChannelRun& r : runs) {
        for (int32_t i = 0; i < r.len; ++i) {
          ASSERT_EQ(owner[r.src + i], -1) << "channel " << r.src + i << " owned twice";
          owner[r.src + i] = s.index;
        }
      }
    }
    for (int32_t ch = 0; ch < c.channels(); ++ch) EXPECT_GE(owner[ch], 0) << ch;
  }
}

TEST(HeadShardTest, ParamsAreTheShardsRowsAndHeads) {
  const ModelConfig c = Preset("small");
  const LayerParams full = MakeLayerParams(c, 1);
  const int32_t W = c.conv_width, K = c.head_k_dim, V = c.head_v_dim, HK = c.num_k_heads * K;
  auto shards = MakeHeadShards(c, 2);
  ASSERT_TRUE(shards.ok());
  const HeadShard& s1 = (*shards)[1];  // key heads 2, 3; value heads 4..7
  const LayerParams p = ShardLayerParams(c, s1, full);
  const ModelConfig sc = ShardModelConfig(c, s1);
  ASSERT_EQ(p.conv_weight.size(), static_cast<size_t>(sc.channels()) * W);
  ASSERT_EQ(p.a_log.size(), 4u);
  // q of key head 2, first channel.
  EXPECT_EQ(p.conv_weight[0], full.conv_weight[static_cast<size_t>(2 * K) * W]);
  // k of key head 3, last channel, last tap.
  const size_t k_last_shard = static_cast<size_t>(2 * 2 * K - 1) * W + (W - 1);
  const size_t k_last_full = static_cast<size_t>(HK + 4 * K - 1) * W + (W - 1);
  EXPECT_EQ(p.conv_weight[k_last_shard], full.conv_weight[k_last_full]);
  // v of value head 4, channel 3, tap 1.
  const size_t v_shard = static_cast<size_t>(4 * K + 3) * W + 1;
  const size_t v_full = static_cast<size_t>(2 * HK + 4 * V + 3) * W + 1;
  EXPECT_EQ(p.conv_weight[v_shard], full.conv_weight[v_full]);
  for (int32_t h = 0; h < 4; ++h) {
    EXPECT_EQ(p.a_log[h], full.a_log[4 + h]);
    EXPECT_EQ(p.dt_bias[h], full.dt_bias[4 + h]);
  }
}

TEST(HeadShardTest, SliceThenPlaceRoundTripsEveryElementSize) {
  const ModelConfig c = Preset("small");
  const int64_t T = 7;
  for (size_t es : {size_t{2}, size_t{4}}) {
    for (int32_t n : {1, 2, 4}) {
      auto shards = MakeHeadShards(c, n);
      ASSERT_TRUE(shards.ok());
      // Distinct bytes everywhere so that any misplaced copy shows.
      std::vector<uint8_t> qkv(T * c.channels() * es), a(T * c.num_v_heads * es),
          b(T * c.num_v_heads * es);
      std::iota(qkv.begin(), qkv.end(), 1);
      std::iota(a.begin(), a.end(), 3);
      std::iota(b.begin(), b.end(), 5);
      std::vector<uint8_t> rebuilt_qkv(qkv.size(), 0), rebuilt_a(a.size(), 0),
          rebuilt_b(b.size(), 0);
      for (const HeadShard& s : *shards) {
        const ModelConfig sc = ShardModelConfig(c, s);
        std::vector<uint8_t> sq(T * sc.channels() * es), sa(T * sc.num_v_heads * es),
            sb(T * sc.num_v_heads * es);
        SliceActivations(c, s, es, T, qkv.data(), a.data(), b.data(), sq.data(), sa.data(),
                         sb.data());
        // Put the slices back with the channel runs and the head ranges.
        for (int64_t t = 0; t < T; ++t) {
          for (const ChannelRun& r : ShardChannelRuns(c, s)) {
            std::memcpy(&rebuilt_qkv[(t * c.channels() + r.src) * es],
                        &sq[(t * sc.channels() + r.dst) * es], r.len * es);
          }
          std::memcpy(&rebuilt_a[(t * c.num_v_heads + s.v_head_begin) * es],
                      &sa[t * sc.num_v_heads * es], sc.num_v_heads * es);
          std::memcpy(&rebuilt_b[(t * c.num_v_heads + s.v_head_begin) * es],
                      &sb[t * sc.num_v_heads * es], sc.num_v_heads * es);
        }
      }
      EXPECT_EQ(rebuilt_qkv, qkv) << "es " << es << " n " << n;
      EXPECT_EQ(rebuilt_a, a);
      EXPECT_EQ(rebuilt_b, b);

      // Outputs: each shard's [T][HV/N][V] lands in its heads of [T][HV][V].
      std::vector<uint8_t> want(T * c.out_elems() * es);
      std::iota(want.begin(), want.end(), 11);
      std::vector<uint8_t> got(want.size(), 0);
      for (const HeadShard& s : *shards) {
        const size_t row = static_cast<size_t>(s.num_v_heads) * c.head_v_dim * es;
        std::vector<uint8_t> part(T * row);
        for (int64_t t = 0; t < T; ++t) {
          std::memcpy(&part[t * row],
                      &want[(t * c.num_v_heads + s.v_head_begin) * c.head_v_dim * es], row);
        }
        PlaceShardOutputs(c, s, es, T, part.data(), got.data());
      }
      EXPECT_EQ(got, want);
    }
  }
}

TEST(HeadShardTest, ShardPoolBytesAreOneNthAndSumToTheModel) {
  const ModelConfig c = Preset("qwen3-next-80b-a3b");
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    PoolSizes sizes;
    sizes.buffer_dtype = dt;
    sizes.conv_dtype = dt;
    sizes.max_drafts = 4;
    const PoolElementBytes full = ComputePoolElementBytes(c, sizes);
    for (int32_t n : {2, 4, 8}) {
      auto shards = MakeHeadShards(c, n);
      ASSERT_TRUE(shards.ok());
      for (const HeadShard& s : *shards) {
        const PoolElementBytes b = ComputePoolElementBytes(ShardModelConfig(c, s), sizes);
        EXPECT_EQ(b.state_slot * n, full.state_slot);
        EXPECT_EQ(b.buffer_row * n, full.buffer_row);
        EXPECT_EQ(b.buffer_page * n, full.buffer_page);
        EXPECT_EQ(b.conv_slot * n, full.conv_slot);
      }
    }
  }
}

TEST(HeadShardTest, StateOffsetsAreContiguousBlocks) {
  const ModelConfig c = Preset("small");
  auto shards = MakeHeadShards(c, 4);
  ASSERT_TRUE(shards.ok());
  int64_t next = 0;
  for (const HeadShard& s : *shards) {
    EXPECT_EQ(ShardStateOffset(c, s), next);
    next += ShardModelConfig(c, s).state_elems();
  }
  EXPECT_EQ(next, c.state_elems());
}

}  // namespace
}  // namespace kvbuffer::parallel
