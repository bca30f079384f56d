// The tensor-parallel protocol's failure handling on CPU shards over the in-process transport:
// a rank that never comes, hangs in a step, hangs while idle, goes silent, or disagrees turns into
// errors on the affected calls and a broken group (never a hung caller); refusals shared by
// every rank leave the group working; heartbeats keep an idle group alive.
#include "service/parallel/tp_backend.h"

#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "service/engine/engine.h"
#include "service/parallel/local_transport.h"
#include "service/parallel/tp_worker.h"

namespace kvbuffer::parallel {
namespace {

// What a test can do to a rank's backend.
struct Faults {
  std::atomic<bool> fail_steps{false};
  std::atomic<int64_t> step_delay_ms{0};
  std::atomic<int64_t> memory_delay_ms{0};
};

// A CPU backend that obeys Faults.
class ControlledBackend : public Backend {
 public:
  explicit ControlledBackend(Faults* f) : inner_(MakeCpuBackend()), f_(f) {}
  std::string Name() const override { return inner_->Name(); }
  absl::Status Allocate(const ModelConfig& c, const std::vector<LayerParams>& p,
                        const PoolSizes& s) override {
    return inner_->Allocate(c, p, s);
  }
  absl::Status RunLayerStep(const LayerStep& step) override {
    if (int64_t d = f_->step_delay_ms.load(); d > 0) absl::SleepFor(absl::Milliseconds(d));
    if (f_->fail_steps.load()) return absl::InternalError("device lost");
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
  BackendMemory Memory() const override {
    if (int64_t d = f_->memory_delay_ms.load(); d > 0) absl::SleepFor(absl::Milliseconds(d));
    return inner_->Memory();
  }

 private:
  std::unique_ptr<Backend> inner_;
  Faults* f_;
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

// A decode call for sequence 1 at `position` on layer 0 (activations kept in `storage`).
LayerCall Decode(const ModelConfig& m, int64_t position, std::vector<float>* storage) {
  std::mt19937 rng(static_cast<uint32_t>(position + 7));
  std::normal_distribution<float> nd;
  storage->resize(m.channels() + 2 * m.num_v_heads);
  for (float& x : *storage) x = nd(rng);
  LayerCall call;
  call.layer = 0;
  call.sequences = {{1, position, 1}};
  const float* p = storage->data();
  call.qkv = {DType::kFloat32, {1, m.channels()}, p, m.channels() * sizeof(float)};
  call.a = {DType::kFloat32, {1, m.num_v_heads}, p + m.channels(), m.num_v_heads * sizeof(float)};
  call.b = {DType::kFloat32,
            {1, m.num_v_heads},
            p + m.channels() + m.num_v_heads,
            m.num_v_heads * sizeof(float)};
  return call;
}

// Rank 0 as a TpBackend inside an Engine, and rank 1 on a thread of the test (as another process
// would run it), with Faults on rank 1.
class TwoRanks {
 public:
  explicit TwoRanks(TpOptions options, bool start_worker = true) : options_(options) {
    auto transports = MakeLocalTransports(2);
    worker_transport_ = std::move(transports[1]);
    worker_compute_ = MakeInPlaceShardCompute(std::make_unique<ControlledBackend>(&faults_));
    options_.on_broken = [this](const absl::Status& s) {
      ++broken_calls_;
      broken_status_ = s;
    };
    if (start_worker) {
      worker_ = std::thread([this] {
        worker_result_ = RunTpWorker(*worker_transport_, *worker_compute_, options_);
        worker_done_.Notify();
      });
    }
    auto leader = TpBackend::Create(std::move(transports[0]),
                                    MakeInPlaceShardCompute(MakeCpuBackend()), options_);
    EXPECT_TRUE(leader.ok()) << leader.status();
    leader_ = leader->get();
    engine_ = Engine::Create(SmallOptions(), *std::move(leader));
  }

  ~TwoRanks() {
    DestroyEngine();
    if (worker_.joinable()) worker_.join();
  }

  // Destroys the engine and with it rank 0 (which tells the worker to leave).
  void DestroyEngine() {
    leader_ = nullptr;
    engine_ = absl::StatusOr<std::unique_ptr<Engine>>(absl::CancelledError("torn down"));
  }

  Engine* engine() { return engine_.ok() ? engine_->get() : nullptr; }
  const absl::Status& engine_status() const { return engine_.status(); }
  TpBackend* leader() { return leader_; }
  Faults& faults() { return faults_; }
  int broken_calls() const { return broken_calls_.load(); }
  absl::Notification& worker_done() { return worker_done_; }
  const absl::Status& worker_result() const { return worker_result_; }

 private:
  TpOptions options_;
  Faults faults_;
  std::unique_ptr<TpTransport> worker_transport_;
  std::unique_ptr<ShardCompute> worker_compute_;
  std::thread worker_;
  absl::Status worker_result_;
  absl::Notification worker_done_;
  std::atomic<int> broken_calls_{0};
  absl::Status broken_status_;
  TpBackend* leader_ = nullptr;
  absl::StatusOr<std::unique_ptr<Engine>> engine_;
};

TpOptions FastOptions() {
  TpOptions o;
  o.command_bytes = 4 << 10;
  o.op_timeout = absl::Seconds(1);
  o.heartbeat_interval = absl::Milliseconds(20);
  o.idle_timeout = absl::Milliseconds(1500);
  return o;
}

TEST(TpBackendTest, RankThatNeverComesFailsCreationWithUnavailable) {
  const absl::Time start = absl::Now();
  TwoRanks g(FastOptions(), /*start_worker=*/false);
  EXPECT_EQ(g.engine_status().code(), absl::StatusCode::kUnavailable) << g.engine_status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ(g.broken_calls(), 1);
}

TEST(TpBackendTest, WorkingGroupServesAndShutsDownCleanly) {
  {
    TwoRanks g(FastOptions());
    ASSERT_NE(g.engine(), nullptr) << g.engine_status();
    ASSERT_TRUE(g.engine()->Open("", {1}).ok());
    std::vector<float> storage;
    for (int64_t pos = 0; pos < 10; ++pos) {
      ASSERT_TRUE(g.engine()->DecodeStep(Decode(SmallOptions().model, pos, &storage)).ok());
    }
    EXPECT_TRUE(g.leader()->Health().ok());
    EXPECT_TRUE(g.leader()->Ping().ok());
    // Both ranks' pools count; each holds half.
    const BackendMemory m = g.leader()->Memory();
    EXPECT_GT(m.pool_bytes, 0);
    EXPECT_EQ(g.broken_calls(), 0);
  }
}

TEST(TpBackendTest, WorkerLeavesOnShutdown) {
  TwoRanks g(FastOptions());
  ASSERT_NE(g.engine(), nullptr);
  // Destroying the engine destroys rank 0, which sends kShutdown. The group itself (and the
  // worker's result) stays alive until the destroying thread has been joined.
  std::thread destroy([&] { g.DestroyEngine(); });
  const bool left = g.worker_done().WaitForNotificationWithTimeout(absl::Seconds(5));
  destroy.join();
  ASSERT_TRUE(left);
  EXPECT_TRUE(g.worker_result().ok()) << g.worker_result();
}

TEST(TpBackendTest, RankHangingInAStepTurnsIntoUnavailableNotAHang) {
  TwoRanks g(FastOptions());
  ASSERT_NE(g.engine(), nullptr) << g.engine_status();
  ASSERT_TRUE(g.engine()->Open("", {1}).ok());
  std::vector<float> storage;
  ASSERT_TRUE(g.engine()->DecodeStep(Decode(SmallOptions().model, 0, &storage)).ok());
  g.faults().step_delay_ms = 3000;
  const absl::Time start = absl::Now();
  auto r = g.engine()->DecodeStep(Decode(SmallOptions().model, 1, &storage));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(2500));  // op_timeout, not the hang
  EXPECT_EQ(g.leader()->Health().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(g.broken_calls(), 1);
  // Every later call fails at once; the failed call changed no sequence.
  auto again = g.engine()->DecodeStep(Decode(SmallOptions().model, 1, &storage));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable);
  auto info = g.engine()->Describe("", 1);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->positions[0], 1);
  EXPECT_EQ(g.broken_calls(), 1);
  // The hung rank, once it wakes, finds the group aborted and leaves.
  ASSERT_TRUE(g.worker_done().WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_FALSE(g.worker_result().ok());
}

TEST(TpBackendTest, RankHangingWhileIdleIsNoticedByTheHeartbeat) {
  TwoRanks g(FastOptions());
  ASSERT_NE(g.engine(), nullptr) << g.engine_status();
  g.faults().memory_delay_ms = 3000;  // every reply (heartbeats too) now hangs
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (g.leader()->Health().ok() && absl::Now() < deadline)
    absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(g.leader()->Health().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(g.broken_calls(), 1);
  EXPECT_EQ(g.engine()->Open("", {1}).code(), absl::StatusCode::kUnavailable);
}

TEST(TpBackendTest, HeartbeatsKeepAnIdleGroupAlive) {
  TwoRanks g(FastOptions());  // idle_timeout 1.5 s, heartbeat every 20 ms
  ASSERT_NE(g.engine(), nullptr) << g.engine_status();
  absl::SleepFor(absl::Milliseconds(3500));
  ASSERT_TRUE(g.engine()->Open("", {1}).ok());
  std::vector<float> storage;
  EXPECT_TRUE(g.engine()->DecodeStep(Decode(SmallOptions().model, 0, &storage)).ok());
  EXPECT_TRUE(g.leader()->Health().ok());
}

TEST(TpBackendTest, SilentLeaderMakesTheWorkerGiveUpAndTheGroupBreak) {
  TpOptions o = FastOptions();
  o.heartbeat_interval = absl::ZeroDuration();  // rank 0 goes silent when idle
  TwoRanks g(o);
  ASSERT_NE(g.engine(), nullptr) << g.engine_status();
  ASSERT_TRUE(g.worker_done().WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_EQ(g.worker_result().code(), absl::StatusCode::kUnavailable) << g.worker_result();
  // The next call (Open resets conv windows on every rank) fails instead of hanging.
  EXPECT_EQ(g.engine()->Open("", {1}).code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(g.leader()->Health().ok());
  EXPECT_EQ(g.broken_calls(), 1);
}

TEST(TpBackendTest, RanksThatDisagreeBreakTheGroup) {
  TwoRanks g(FastOptions());
  ASSERT_NE(g.engine(), nullptr) << g.engine_status();
  ASSERT_TRUE(g.engine()->Open("", {1}).ok());
  g.faults().fail_steps = true;  // rank 1 only
  std::vector<float> storage;
  auto r = g.engine()->DecodeStep(Decode(SmallOptions().model, 0, &storage));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal) << r.status();
  EXPECT_NE(r.status().message().find("diverged"), std::string::npos) << r.status();
  EXPECT_EQ(g.leader()->Health().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(g.broken_calls(), 1);
}

TEST(TpBackendTest, RefusalOnEveryRankKeepsTheGroup) {
  TwoRanks g(FastOptions());
  ASSERT_NE(g.engine(), nullptr) << g.engine_status();
  std::vector<float> state(SmallOptions().model.state_elems());
  EXPECT_EQ(g.leader()->ReadState(SmallOptions().state_slots, 0, state.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(g.leader()->ResetConv(std::vector<int32_t>{-1}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(g.leader()->Health().ok());
  ASSERT_TRUE(g.engine()->Open("", {1}).ok());
  std::vector<float> storage;
  EXPECT_TRUE(g.engine()->DecodeStep(Decode(SmallOptions().model, 0, &storage)).ok());
  EXPECT_EQ(g.broken_calls(), 0);
}

TEST(TpBackendTest, GroupSizeMustDivideKeyHeads) {
  std::vector<std::unique_ptr<ShardCompute>> computes;
  for (int i = 0; i < 3; ++i) computes.push_back(MakeInPlaceShardCompute(MakeCpuBackend()));
  auto b = MakeInProcessTpBackend(MakeLocalTransports(3), std::move(computes), FastOptions());
  ASSERT_TRUE(b.ok());
  auto engine = Engine::Create(SmallOptions(), *std::move(b));  // H = 4
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument) << engine.status();
}

TEST(TpBackendTest, RejectsMismatchedRanks) {
  auto t = MakeLocalTransports(2);
  EXPECT_EQ(
      TpBackend::Create(std::move(t[1]), MakeInPlaceShardCompute(MakeCpuBackend()), FastOptions())
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  TpOptions tiny = FastOptions();
  tiny.command_bytes = 64;
  EXPECT_EQ(TpBackend::Create(std::move(t[0]), MakeInPlaceShardCompute(MakeCpuBackend()), tiny)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvbuffer::parallel
