// The wire format between ranks: fixed struct sizes, model and parameter round trips, metadata
// decoding and its checks, statuses, layouts.
#include "service/parallel/tp_protocol.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "service/parallel/head_shard.h"

namespace kvbuffer::parallel {
namespace {

TEST(TpProtocolTest, ModelAndPoolsRoundTrip) {
  ModelConfig c;
  ASSERT_TRUE(ModelPreset("qwen3-next-80b-a3b", &c));
  c.param_seed = 0x1234567890abcdefull;
  PoolSizes s;
  s.state_slots = 11;
  s.buffer_pages = 22;
  s.page_tokens = 4;
  s.conv_slots = 33;
  s.max_drafts = 5;
  s.buffer_dtype = DType::kBFloat16;
  s.conv_dtype = DType::kFloat16;
  CommandHeader h;
  PutModel(c, s, &h);
  ModelConfig c2;
  PoolSizes s2;
  GetModel(h, &c2, &s2);
  EXPECT_EQ(c2, c);
  EXPECT_EQ(s2.state_slots, 11);
  EXPECT_EQ(s2.buffer_pages, 22);
  EXPECT_EQ(s2.page_tokens, 4);
  EXPECT_EQ(s2.conv_slots, 33);
  EXPECT_EQ(s2.max_drafts, 5);
  EXPECT_EQ(s2.buffer_dtype, DType::kBFloat16);
  EXPECT_EQ(s2.conv_dtype, DType::kFloat16);
}

TEST(TpProtocolTest, ParamsRoundTripPerShard) {
  ModelConfig c;
  ASSERT_TRUE(ModelPreset("small", &c));
  const std::vector<LayerParams> full = MakeAllLayerParams(c);
  for (int32_t n : {1, 2, 4}) {
    for (int32_t r = 0; r < n; ++r) {
      const HeadShard shard = *MakeHeadShard(c, r, n);
      const ModelConfig sc = ShardModelConfig(c, shard);
      const std::vector<LayerParams> want = ShardAllLayerParams(c, shard, full);
      std::vector<uint8_t> bytes(ParamBytes(sc));
      EXPECT_EQ(bytes.size() % kTpAlign, 0u);
      PackParams(sc, want, bytes.data());
      const std::vector<LayerParams> got = UnpackParams(sc, bytes.data());
      ASSERT_EQ(got.size(), want.size());
      for (size_t l = 0; l < got.size(); ++l) {
        EXPECT_EQ(got[l].conv_weight, want[l].conv_weight);
        EXPECT_EQ(got[l].a_log, want[l].a_log);
        EXPECT_EQ(got[l].dt_bias, want[l].dt_bias);
      }
    }
  }
}

TEST(TpProtocolTest, StepMetadataRoundTripsAndIsChecked) {
  std::vector<StepItem> items(3);
  for (int i = 0; i < 3; ++i) {
    items[i].token_offset = 10 * i;
    items[i].num_tokens = i + 1;
    items[i].state_slot = i - 1;
    items[i].fold_first = i == 2;
    items[i].chunked = i == 1;
    items[i].fold_tokens = 64 * i;
    items[i].page_offset = i;
    items[i].num_pages = 1;
  }
  const std::vector<int32_t> pages = {7, 8, 9};
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kStep);
  h.num_items = 3;
  h.page_table_len = 3;
  h.meta_bytes = static_cast<int64_t>(StepMetaBytes(3, 3));
  std::vector<uint8_t> bytes(h.meta_bytes);
  PackStepMeta(items, pages, bytes.data());
  DecodedMeta m;
  ASSERT_TRUE(DecodeMeta(h, bytes.data(), &m).ok());
  ASSERT_EQ(m.step_items.size(), 3u);
  EXPECT_EQ(std::memcmp(m.step_items.data(), items.data(), sizeof(StepItem) * 3), 0);
  EXPECT_EQ(m.ints, pages);
  h.meta_bytes -= 4;
  EXPECT_EQ(DecodeMeta(h, bytes.data(), &m).code(), absl::StatusCode::kInternal);
}

TEST(TpProtocolTest, FoldCommitAndResetMetadata) {
  std::vector<FoldItem> folds(2);
  folds[1].state_slot = 5;
  folds[1].buffer_rows = 3;
  const std::vector<int32_t> pages = {1, 2};
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kFold);
  h.num_items = 2;
  h.page_table_len = 2;
  h.meta_bytes = static_cast<int64_t>(FoldMetaBytes(2, 2));
  std::vector<uint8_t> bytes(h.meta_bytes);
  PackFoldMeta(folds, pages, bytes.data());
  DecodedMeta m;
  ASSERT_TRUE(DecodeMeta(h, bytes.data(), &m).ok());
  EXPECT_EQ(m.fold_items[1].state_slot, 5);
  EXPECT_EQ(m.fold_items[1].buffer_rows, 3);
  EXPECT_EQ(m.ints, pages);

  const std::vector<int32_t> slots = {4, 0, 9};
  h = CommandHeader{};
  h.op = static_cast<uint32_t>(TpOp::kResetConv);
  h.num_items = 3;
  h.meta_bytes = 12;
  ASSERT_TRUE(DecodeMeta(h, slots.data(), &m).ok());
  EXPECT_EQ(m.ints, slots);
}

TEST(TpProtocolTest, HeaderChecks) {
  CommandHeader h;
  EXPECT_EQ(CheckHeader(h).code(), absl::StatusCode::kInternal);
  h.magic = kTpMagic;
  h.layout = kTpLayout + 1;
  EXPECT_NE(CheckHeader(h).message().find("different builds"), std::string::npos);
  h.layout = kTpLayout;
  EXPECT_TRUE(CheckHeader(h).ok());
  h.next_block_bytes = kMaxTpBlockBytes + 1;
  EXPECT_FALSE(CheckHeader(h).ok());
  h.next_block_bytes = 64 << 10;
  EXPECT_TRUE(CheckHeader(h).ok());
  h.op = 99;
  EXPECT_FALSE(CheckHeader(h).ok());
}

TEST(TpProtocolTest, StatusRoundTripTruncatesLongMessages) {
  RankStatus rs;
  PutStatus(absl::ResourceExhaustedError(std::string(1000, 'x')), 3, 42, BackendMemory{1, 2, 3},
            &rs);
  EXPECT_EQ(rs.rank, 3);
  EXPECT_EQ(rs.sequence, 42u);
  EXPECT_EQ(rs.pool_bytes, 1);
  const absl::Status s = GetStatus(rs);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message().size(), sizeof(rs.message) - 1);
  PutStatus(absl::OkStatus(), 0, 1, {}, &rs);
  EXPECT_TRUE(GetStatus(rs).ok());
}

TEST(TpProtocolTest, LayoutsAreAlignedAndInlineOffsetsFollowTheMetadata) {
  ModelConfig c;
  ASSERT_TRUE(ModelPreset("small", &c));
  const StepInputLayout l = ComputeStepInputLayout(c, 3, DType::kBFloat16);
  EXPECT_EQ(l.qkv, 0u);
  EXPECT_EQ(l.a % kTpAlign, 0u);
  EXPECT_EQ(l.b % kTpAlign, 0u);
  EXPECT_EQ(l.total % kTpAlign, 0u);
  EXPECT_GE(l.a, 3u * c.channels() * 2);
  CommandHeader h;
  h.meta_bytes = 100;
  h.input_bytes = static_cast<int64_t>(l.total);
  EXPECT_EQ(InlineInputOffset(h, 0), TpAlign(sizeof(CommandHeader) + 100));
  EXPECT_EQ(InlineInputOffset(h, 2) - InlineInputOffset(h, 1), l.total);
  EXPECT_EQ(GatherSlotBytes(h), sizeof(RankStatus));
}

}  // namespace
}  // namespace kvbuffer::parallel
