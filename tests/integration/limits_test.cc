// Message limits, deadlines, cancellation and idle reclaim, observed over the wire.
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/cpp/tensor_builder.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "gtest/gtest.h"
#include "service/engine/engine.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::HasSubstr;

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

// A Prefill of `tokens` tokens for sequence `id` at position 0 with zero-ish activations.
v1::PrefillRequest BigPrefill(const ModelConfig& m, uint64_t id, int64_t tokens) {
  v1::PrefillRequest r;
  r.set_layer(0);
  v1::SequenceTokens* s = r.add_sequences();
  s->set_id(id);
  s->set_position(0);
  s->set_num_tokens(static_cast<int32_t>(tokens));
  std::vector<float> qkv(static_cast<size_t>(tokens) * m.channels(), 0.25f);
  std::vector<float> ab(static_cast<size_t>(tokens) * m.num_v_heads, 0.5f);
  const int64_t qkv_shape[] = {tokens, m.channels()};
  const int64_t ab_shape[] = {tokens, m.num_v_heads};
  client::SetTensor(qkv, qkv_shape, DType::kFloat32, r.mutable_qkv());
  client::SetTensor(ab, ab_shape, DType::kFloat32, r.mutable_a());
  client::SetTensor(ab, ab_shape, DType::kFloat32, r.mutable_b());
  return r;
}

TEST(MessageLimitTest, DefaultLimitFitsBatch512DecodeAtQwen3NextShapes) {
  ModelConfig q;
  ASSERT_TRUE(ModelPreset("qwen3-next-80b-a3b", &q));
  const int64_t batch = 512;
  const int64_t request = batch * (q.channels() + 2 * q.num_v_heads) * 2 + batch * 32;  // BF16
  const int64_t response = batch * q.out_elems() * 4;                                   // FP32
  EXPECT_GE(server::ServerOptions().max_message_bytes, 8 * std::max(request, response));
}

TEST(MessageLimitTest, APayloadAboveTheLimitIsRejectedAndTheServerKeepsServing) {
  server::ServerOptions options;
  options.max_message_bytes = 1 << 20;
  auto server = InProcessServer::Start(SmallModelOptions(), options);
  ASSERT_NE(server, nullptr);
  const ModelConfig& m = server->engine()->options().model;
  auto client = client::Client::Connect(server->address());
  absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->max_message_bytes(), 1 << 20);
  const uint64_t id = 5;
  ASSERT_OK(client->OpenSequences({&id, 1}));

  // 1200 tokens x 320 channels x 4 bytes: about 1.5 MiB.
  v1::PrefillRequest big = BigPrefill(m, id, 1200);
  ASSERT_GT(big.ByteSizeLong(), size_t{1} << 20);
  v1::LayerOutput out;
  absl::Status s = client->Prefill(big, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("larger than max"));

  // The same on a Stream ends that stream with RESOURCE_EXHAUSTED.
  {
    auto stream = client->OpenStream(absl::Seconds(30));
    absl::StatusOr<v1::LayerOutput> r = stream->Prefill(BigPrefill(m, id, 1200));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  }

  // The server still serves, and the sequence was never touched: a fitting prefill works at 0.
  v1::PrefillRequest small = BigPrefill(m, id, 100);
  ASSERT_OK(client->Prefill(small, &out));
  EXPECT_EQ(out.positions(0), 100);
  EXPECT_FALSE(out.replayed());
  auto stream = client->OpenStream(absl::Seconds(30));
  absl::StatusOr<v1::GetServerInfoResponse> again = stream->GetServerInfo({});
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_OK(stream->Close());
}

// A server whose single executor thread the test can hold, to make calls wait.
class HeldExecutorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto executor = std::make_unique<server::Executor>(1);
    executor_ = executor.get();
    server_ = InProcessServer::Start(SmallModelOptions(), {}, std::move(executor));
    ASSERT_NE(server_, nullptr);
    driver_ = std::make_unique<WireDriver>(server_->address(), "unary", 4);
    ASSERT_OK(driver_->Init());
    seq_ = driver_->NewSequence(61);
    ASSERT_OK(driver_->Open({seq_}));
    ASSERT_OK(driver_->Prefill({seq_}, {10}));
  }

  void Hold() {
    executor_->Schedule([this] { release_.WaitForNotification(); });
    while (executor_->queued() > 0) absl::SleepFor(absl::Milliseconds(1));  // the hold runs
  }

  // Waits until `n` calls queue behind the hold.
  bool WaitQueued(int64_t n) {
    const absl::Time until = absl::Now() + absl::Seconds(10);
    while (executor_->queued() < n && absl::Now() < until) absl::SleepFor(absl::Milliseconds(1));
    return executor_->queued() >= n;
  }

  void ReleaseAndDrain() {
    release_.Notify();
    while (executor_->queued() > 0) absl::SleepFor(absl::Milliseconds(1));
    absl::SleepFor(absl::Milliseconds(50));
  }

  int64_t ServerPosition(int32_t layer) {
    absl::StatusOr<SequenceInfo> info = server_->engine()->Describe("", seq_->id());
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->positions[layer] : -1;
  }

  server::Executor* executor_ = nullptr;
  absl::Notification release_;
  std::unique_ptr<InProcessServer> server_;
  std::unique_ptr<WireDriver> driver_;
  mock::CheckedSequence* seq_ = nullptr;
};

TEST_F(HeldExecutorTest, ACallWhoseDeadlinePassedWhileQueuedDoesNoWork) {
  Hold();
  v1::StreamRequest call = driver_->DecodeCall(0, {seq_});
  v1::LayerOutput out;
  client::CallOptions opts;
  opts.timeout = absl::Milliseconds(1500);  // reaches the server even on a loaded machine
  opts.max_attempts = 1;
  absl::Status s;
  std::thread caller([&] { s = driver_->client()->DecodeStep(call.decode_step(), &out, opts); });
  ASSERT_TRUE(WaitQueued(1));  // the call reached the server and waits for the executor
  caller.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  // The server's deadline is the client's shifted by the time the call took to arrive: give it
  // that margin before the executor is released.
  absl::SleepFor(absl::Milliseconds(500));
  ReleaseAndDrain();
  EXPECT_EQ(ServerPosition(0), 10);  // not applied
  // The same call now runs for real (not a replay) and the sequence goes on.
  ASSERT_OK(driver_->client()->DecodeStep(call.decode_step(), &out));
  EXPECT_FALSE(out.replayed());
  EXPECT_EQ(out.positions(0), 11);
}

TEST_F(HeldExecutorTest, ACancelledCallDoesNoWork) {
  Hold();
  v1::StreamRequest call = driver_->DecodeCall(0, {seq_});
  v1::LayerOutput out;
  grpc::ClientContext context;
  grpc::Status s;
  std::thread caller(
      [&] { s = driver_->client()->stub()->DecodeStep(&context, call.decode_step(), &out); });
  ASSERT_TRUE(WaitQueued(1));
  context.TryCancel();
  caller.join();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
  // Cancellation reaches the server asynchronously: a later call on the same connection (the
  // health service does not use the held executor) comes after the cancel, plus a margin.
  ASSERT_TRUE(driver_->client()->CheckHealth("liveness").ok());
  absl::SleepFor(absl::Milliseconds(100));
  ReleaseAndDrain();
  EXPECT_EQ(ServerPosition(0), 10);
  ASSERT_OK(driver_->Decode({seq_}));  // and the sequence still matches its oracle
}

TEST(IdleReclaimTest, IdleSequencesAreClosedInTheBackground) {
  EngineOptions o = SmallModelOptions();
  o.idle_ttl = absl::Seconds(1);  // longer than any gap between the calls below, even in TSan
  server::ServerOptions options;
  options.reclaim_interval = absl::Milliseconds(50);
  auto server = InProcessServer::Start(o, options);
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "unary", 2);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(71);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {70}));  // holds a state slot
  const absl::Time until = absl::Now() + absl::Seconds(10);
  int32_t open = 1;
  while (open > 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(50));
    absl::StatusOr<v1::GetServerInfoResponse> info = d.client()->GetServerInfo();
    ASSERT_TRUE(info.ok());
    open = info->capacity().open_sequences();
  }
  EXPECT_EQ(open, 0);
  absl::Status s = d.Decode({a});
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  absl::StatusOr<v1::GetServerInfoResponse> info = d.client()->GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->capacity().free_state_slots(), o.state_slots);  // its slot came back
}

}  // namespace
}  // namespace kvbuffer::testing
