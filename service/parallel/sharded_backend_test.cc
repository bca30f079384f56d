// ShardedBackend on its own: creation and allocation errors, state gathering, and the health
// rule (a call failing on some shards only breaks the group for good).
#include "service/parallel/sharded_backend.h"

#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "service/engine/engine.h"

namespace kvbuffer::parallel {
namespace {

// A CPU backend whose steps fail while *fail is set.
class FlakyBackend : public Backend {
 public:
  explicit FlakyBackend(const std::atomic<bool>* fail) : inner_(MakeCpuBackend()), fail_(fail) {}
  std::string Name() const override { return inner_->Name(); }
  absl::Status Allocate(const ModelConfig& c, const std::vector<LayerParams>& p,
                        const PoolSizes& s) override {
    return inner_->Allocate(c, p, s);
  }
  absl::Status RunLayerStep(const LayerStep& step) override {
    if (fail_->load()) return absl::InternalError("device lost");
    return inner_->RunLayerStep(step);
  }
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override {
    return inner_->FoldBuffers(layer, items, page_table);
  }
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override {
    return inner_->CommitConv(layer, items);
  }
  absl::Status ResetConv(std::span<const int32_t> slots) override {
    return inner_->ResetConv(slots);
  }
  absl::Status ReadState(int32_t slot, int32_t layer, float* out) override {
    return inner_->ReadState(slot, layer, out);
  }
  BackendMemory Memory() const override { return inner_->Memory(); }

 private:
  std::unique_ptr<Backend> inner_;
  const std::atomic<bool>* fail_;
};

EngineOptions SmallOptions() {
  EngineOptions o;
  EXPECT_TRUE(ModelPreset("small", &o.model));
  o.flush_interval = 4;
  o.stateless_limit = 4;
  o.max_drafts = 4;
  o.max_sequences = 8;
  o.state_slots = 8;
  o.buffer_pages = 64;
  o.page_tokens = 4;
  return o;
}

// A decode call for sequence `id` at `position` with random activations kept in `storage`.
LayerCall DecodeCall(const ModelConfig& m, uint64_t id, int64_t position, int32_t layer,
                     std::vector<float>* storage) {
  std::mt19937 rng(static_cast<uint32_t>(position * 31 + layer));
  std::normal_distribution<float> nd;
  storage->resize(m.channels() + 2 * m.num_v_heads);
  for (float& x : *storage) x = nd(rng);
  LayerCall call;
  call.layer = layer;
  call.sequences = {{id, position, 1}};
  const float* p = storage->data();
  call.qkv = {DType::kFloat32, {1, m.channels()}, p, m.channels() * sizeof(float)};
  call.a = {DType::kFloat32, {1, m.num_v_heads}, p + m.channels(), m.num_v_heads * sizeof(float)};
  call.b = {DType::kFloat32,
            {1, m.num_v_heads},
            p + m.channels() + m.num_v_heads,
            m.num_v_heads * sizeof(float)};
  return call;
}

TEST(ShardedBackendTest, CreateRejectsBadOptions) {
  ShardedBackendOptions o;
  o.num_shards = 0;
  o.make_shard = [](int32_t) { return MakeCpuBackend(); };
  EXPECT_EQ(ShardedBackend::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.num_shards = 2;
  o.make_shard = nullptr;
  EXPECT_EQ(ShardedBackend::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.make_shard = [](int32_t s) { return s == 1 ? nullptr : MakeCpuBackend(); };
  EXPECT_EQ(ShardedBackend::Create(o).status().code(), absl::StatusCode::kInternal);
}

TEST(ShardedBackendTest, ShardCountMustDivideKeyHeads) {
  auto backend = MakeShardedCpuBackend(3);
  ASSERT_TRUE(backend.ok());
  auto engine = Engine::Create(SmallOptions(), *std::move(backend));  // H = 4
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(engine.status().message().find("must divide the key heads"), std::string::npos)
      << engine.status();
}

TEST(ShardedBackendTest, CallsBeforeAllocateFail) {
  auto backend = MakeShardedCpuBackend(2);
  ASSERT_TRUE(backend.ok());
  std::vector<float> out(16);
  EXPECT_EQ((*backend)->ReadState(0, 0, out.data()).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*backend)->ResetConv({}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*backend)->Name(), "cpu-tp2");
}

TEST(ShardedBackendTest, ReadStateGathersEveryShardsHeads) {
  const EngineOptions o = SmallOptions();
  auto backend = MakeShardedCpuBackend(4);
  ASSERT_TRUE(backend.ok());
  ShardedBackend* tp = backend->get();
  auto engine = Engine::Create(o, *std::move(backend));
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->Open("", {1}).ok());
  std::vector<float> storage;
  for (int64_t pos = 0; pos < 6; ++pos) {  // past the stateless limit: a state exists
    ASSERT_TRUE((*engine)->DecodeStep(DecodeCall(o.model, 1, pos, 0, &storage)).ok());
  }
  const ModelConfig& m = o.model;
  std::vector<float> full(m.state_elems());
  ASSERT_TRUE(tp->ReadState(0, 0, full.data()).ok());
  for (int32_t s = 0; s < 4; ++s) {
    const int64_t per = m.state_elems() / 4;
    std::vector<float> part(per);
    ASSERT_TRUE(tp->shard_backend(s)->ReadState(0, 0, part.data()).ok());
    EXPECT_EQ(0, std::memcmp(part.data(), full.data() + s * per, per * sizeof(float))) << s;
  }
  double norm = 0;
  for (float x : full) norm += static_cast<double>(x) * x;
  EXPECT_GT(norm, 0.0);
  EXPECT_EQ(tp->ReadState(o.state_slots, 0, full.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ShardedBackendTest, FailureOnAllShardsPassesThroughAndKeepsTheGroup) {
  std::atomic<bool> fail{false};
  ShardedBackendOptions so;
  so.num_shards = 2;
  so.make_shard = [&fail](int32_t) { return std::make_unique<FlakyBackend>(&fail); };
  auto backend = ShardedBackend::Create(std::move(so));
  ASSERT_TRUE(backend.ok());
  ShardedBackend* tp = backend->get();
  const EngineOptions o = SmallOptions();
  auto engine = Engine::Create(o, *std::move(backend));
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->Open("", {1}).ok());
  std::vector<float> storage;
  fail = true;
  absl::StatusOr<LayerResult> r = (*engine)->DecodeStep(DecodeCall(o.model, 1, 0, 0, &storage));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(r.status().message(), "device lost");
  EXPECT_TRUE(tp->Health().ok());
  fail = false;
  EXPECT_TRUE((*engine)->DecodeStep(DecodeCall(o.model, 1, 0, 0, &storage)).ok());
}

TEST(ShardedBackendTest, FailureOnSomeShardsBreaksTheGroupForGood) {
  std::atomic<bool> fail{false};
  const std::atomic<bool> never{false};
  for (bool concurrent : {false, true}) {
    ShardedBackendOptions so;
    so.num_shards = 4;
    so.concurrent = concurrent;
    so.make_shard = [&](int32_t s) {
      return std::make_unique<FlakyBackend>(s == 2 ? &fail : &never);
    };
    auto backend = ShardedBackend::Create(std::move(so));
    ASSERT_TRUE(backend.ok());
    ShardedBackend* tp = backend->get();
    const EngineOptions o = SmallOptions();
    auto engine = Engine::Create(o, *std::move(backend));
    ASSERT_TRUE(engine.ok());
    ASSERT_TRUE((*engine)->Open("", {1}).ok());
    std::vector<float> storage;
    ASSERT_TRUE((*engine)->DecodeStep(DecodeCall(o.model, 1, 0, 0, &storage)).ok());
    fail = true;
    auto r = (*engine)->DecodeStep(DecodeCall(o.model, 1, 1, 0, &storage));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
    EXPECT_NE(r.status().message().find("diverged (shard 2"), std::string::npos) << r.status();
    EXPECT_EQ(tp->Health().code(), absl::StatusCode::kInternal);
    fail = false;
    // Every later call is refused, whatever it is.
    r = (*engine)->DecodeStep(DecodeCall(o.model, 1, 1, 0, &storage));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
    EXPECT_EQ((*engine)->Flush("", {1}).code(), absl::StatusCode::kInternal);
    std::vector<float> state(o.model.state_elems());
    EXPECT_EQ(tp->ReadState(0, 0, state.data()).code(), absl::StatusCode::kInternal);
  }
}

}  // namespace
}  // namespace kvbuffer::parallel
