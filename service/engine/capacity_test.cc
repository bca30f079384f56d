// Capacity accounting: KVBuffer against the recurrent layout at Qwen3-Next shapes.
#include "service/engine/capacity.h"

#include <cstdio>

#include "gtest/gtest.h"
#include "service/engine/engine.h"

namespace kvbuffer {
namespace {

constexpr int64_t kBudget = 64ll << 30;  // a fixed 64 GiB budget

EngineOptions Qwen() {
  EngineOptions o;
  EXPECT_TRUE(ModelPreset("qwen3-next-80b-a3b", &o.model));
  return o;
}

PoolElementBytes Bytes(const EngineOptions& o) {
  PoolSizes s;
  s.page_tokens = o.page_tokens;
  s.max_drafts = o.max_drafts;
  s.buffer_dtype = o.buffer_dtype;
  s.conv_dtype = o.conv_dtype;
  return ComputePoolElementBytes(o.model, s);
}

void Print(const char* name, const CapacityEstimate& e) {
  std::printf("%-28s len=%lld drafts=%d kvbuffer=%lld B recurrent=%lld B fit=%lld vs %lld (%.2fx)\n",
              name, static_cast<long long>(e.length), e.drafts,
              static_cast<long long>(e.kvbuffer_bytes_per_sequence),
              static_cast<long long>(e.recurrent_bytes_per_sequence),
              static_cast<long long>(e.max_sequences_at_equal_memory),
              static_cast<long long>(e.recurrent_sequences_at_equal_memory), e.ratio);
}

TEST(Capacity, FourDraftsFitAtLeast4p5TimesTheRecurrentLayout) {
  // The memory-lean configuration: bf16 buffer rows and conv windows, C = 12, 4 drafts, pages of
  // 4 rows. The recurrent layout keeps the same dtypes: fp32 states, bf16 conv windows.
  EngineOptions o = Qwen();
  o.buffer_dtype = DType::kBFloat16;
  o.conv_dtype = DType::kBFloat16;
  o.flush_interval = 12;
  o.max_drafts = 4;
  o.page_tokens = 4;
  ASSERT_TRUE(ValidateEngineOptions(o).ok());
  CapacityEstimate e = EstimateCapacity(o, Bytes(o), 8192, 4, FreePools{}, kBudget);
  Print("lean (bf16 rows, C=12)", e);
  EXPECT_GE(static_cast<double>(e.max_sequences_at_equal_memory),
            4.5 * static_cast<double>(e.recurrent_sequences_at_equal_memory));
  EXPECT_GE(e.ratio, 4.5);
  // The exact default (fp32 rows and windows, C = 16) is reported for the record and must still
  // beat the recurrent layout by a wide margin.
  EngineOptions d = Qwen();
  d.max_drafts = 4;
  d.page_tokens = 4;
  CapacityEstimate ed = EstimateCapacity(d, Bytes(d), 8192, 4, FreePools{}, kBudget);
  Print("exact (fp32 rows, C=16)", ed);
  EXPECT_GE(ed.ratio, 3.5);
}

TEST(Capacity, SequenceUnderTheStatelessLimitHoldsNoStateBytes) {
  EngineOptions o = Qwen();
  o.max_drafts = 4;
  PoolElementBytes b = Bytes(o);
  CapacityEstimate e = EstimateCapacity(o, b, o.stateless_limit - 4, 4, FreePools{}, kBudget);
  Print("short (stateless)", e);
  EXPECT_LT(e.kvbuffer_bytes_per_sequence, b.state_slot);
  EXPECT_EQ(e.kvbuffer_bytes_per_sequence,
            b.conv_slot + (o.stateless_limit + o.page_tokens - 1) / o.page_tokens * b.buffer_page);
  CapacityEstimate longer = EstimateCapacity(o, b, o.stateless_limit, 4, FreePools{}, kBudget);
  EXPECT_GE(longer.kvbuffer_bytes_per_sequence, b.state_slot);
}

TEST(Capacity, ShortSequenceInTheEngineHoldsNoStateSlot) {
  EngineOptions o;
  ASSERT_TRUE(ModelPreset("small", &o.model));
  o.state_slots = 4;
  auto engine = Engine::Create(o, MakeCpuBackend());
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->Open("", {1}).ok());
  auto info = (*engine)->Describe("", 1);
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->has_state);
  EngineInfo ei = (*engine)->Info();
  EXPECT_EQ(info->bytes, ei.element_bytes.conv_slot);
  EXPECT_EQ(ei.free_state_slots, 4);
}

}  // namespace
}  // namespace kvbuffer
