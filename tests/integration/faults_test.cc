// Faults injected while sequences are in flight: a client killed mid-stream, a Stream cancelled
// before and while its call runs, a deadline passing while a call runs, an answer lost and the
// call resent on a new stream, a pool exhausted (and a device failing) in the middle of a batch,
// and a drain. After each, the surviving sequences go on and every output still matches its fp64
// oracle, and nothing is lost: slots and pages all come back.
#include <signal.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/engine/cpu_backend.h"
#include "service/server/drain.h"
#include "tests/integration/gated_backend.h"
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

int64_t Position(InProcessServer* server, uint64_t id, int32_t layer = 0) {
  absl::StatusOr<SequenceInfo> info = server->engine()->Describe("", id);
  return info.ok() ? info->positions[layer] : -1;
}

// Every pool element is free again.
void ExpectPoolsWhole(InProcessServer* server, const EngineOptions& o) {
  const EngineInfo info = server->engine()->Info();
  EXPECT_EQ(info.open_sequences, 0);
  EXPECT_EQ(info.free_conv_slots, o.max_sequences);
  EXPECT_EQ(info.free_state_slots, o.state_slots);
  EXPECT_EQ(info.free_buffer_pages, o.buffer_pages);
}

// Polls `done` every 10 ms for up to `timeout`; whether it became true.
template <typename Pred>
bool Eventually(Pred done, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time until = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > until) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

TEST(FaultTest, AClientKilledMidStreamIsReclaimedAfterTheIdleTtlWhileOthersGoOn) {
  EngineOptions e = SmallModelOptions();
  e.idle_ttl = absl::Seconds(2);
  server::ServerOptions o;
  o.reclaim_interval = absl::Milliseconds(100);
  auto server = InProcessServer::Start(e, o);
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "stream", 31);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(900001);
  auto* b = d.NewSequence(900002);
  ASSERT_OK(d.Open({a, b}));
  ASSERT_OK(d.Prefill({a, b}, {70, 5}));

  // The survivors stay in use while the worker starts, steps and dies (a decode at least every
  // 0.5 s, well inside the 2 s TTL): on a loaded machine (sanitizer builds, parallel tests) that
  // takes seconds, and only the worker's sequences may go idle.
  absl::Time last_step = absl::Now();
  auto keep_survivors = [&] {
    if (absl::Now() - last_step < absl::Milliseconds(500)) return absl::OkStatus();
    last_step = absl::Now();
    return d.Decode({a, b});
  };

  // A mock worker process with two Streams that would run for hours.
  absl::StatusOr<pid_t> worker =
      SpawnProgram({MockWorkerBinary(), "--server=" + server->address(), "--mode=stream",
                    "--concurrency=2", "--batch=4", "--rounds=100000000", "--seed=77"});
  ASSERT_TRUE(worker.ok()) << worker.status();
  absl::Status kept;
  ASSERT_TRUE(Eventually([&] {
    kept.Update(keep_survivors());
    return server->engine()->Info().open_sequences >= 2 + 8;
  })) << "the worker never opened its sequences";
  const int64_t flushes_before = server->engine()->Info().flushes;
  ASSERT_TRUE(Eventually([&] {
    kept.Update(keep_survivors());
    return server->engine()->Info().flushes > flushes_before + 8;
  })) << "the worker is not stepping";
  ASSERT_OK(kept);
  kill(*worker, SIGKILL);
  absl::StatusOr<std::string> ended = WaitProgram(*worker, absl::Seconds(10));
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_EQ(*ended, "signal 9");
  ASSERT_OK(keep_survivors());
  const int32_t orphans = server->engine()->Info().open_sequences - 2;
  EXPECT_GE(orphans, 1);

  // The survivors keep stepping (staying in use, so the reclaimer leaves them) and keep matching
  // their oracles until the orphans are gone.
  int steps = 0;
  const absl::Time until = absl::Now() + absl::Seconds(20);
  while (server->engine()->Info().open_sequences > 2 && absl::Now() < until) {
    if (++steps % 4 == 0) {
      ASSERT_OK(d.Verify({a, b}, {3, 2}));
      ASSERT_OK(d.Commit({a, b}, {2, 0}));
    } else {
      ASSERT_OK(d.Decode({a, b}));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(server->engine()->Info().open_sequences, 2) << "orphans were not reclaimed";
  EXPECT_GT(steps, 5);
  ASSERT_OK(d.Decode({a, b}));
  ASSERT_OK(d.Close({a, b}));
  ASSERT_OK(d.CloseTransport());
  ExpectPoolsWhole(server.get(), e);
}

// A server on a GatedBackend with one executor thread the test can hold.
class HeldServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto gated = std::make_unique<GatedBackend>(MakeCpuBackend());
    gate_ = gated.get();
    auto executor = std::make_unique<server::Executor>(1);
    executor_ = executor.get();
    server_ = InProcessServer::Start(options_, {}, std::move(executor), std::move(gated));
    ASSERT_NE(server_, nullptr);
    client_ = client::Client::Connect(server_->address());
    driver_ = std::make_unique<WireDriver>(server_->address(), "unary", 5);
    ASSERT_OK(driver_->Init());
    seq_ = driver_->NewSequence(61);
    ASSERT_OK(driver_->Open({seq_}));
    ASSERT_OK(driver_->Prefill({seq_}, {10}));
  }

  // Holds the executor's only thread until the returned notification fires.
  std::unique_ptr<absl::Notification> HoldExecutor() {
    auto release = std::make_unique<absl::Notification>();
    executor_->Schedule([r = release.get()] { r->WaitForNotification(); });
    EXPECT_TRUE(Eventually([&] { return executor_->queued() == 0; }));  // the hold runs
    return release;
  }

  EngineOptions options_ = SmallModelOptions();
  GatedBackend* gate_ = nullptr;
  server::Executor* executor_ = nullptr;
  std::unique_ptr<InProcessServer> server_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<WireDriver> driver_;
  mock::CheckedSequence* seq_ = nullptr;
};

TEST_F(HeldServerTest, AStreamCancelledBeforeItsCallRanDoesNoWorkAndTheResendRunsOnce) {
  std::unique_ptr<absl::Notification> release = HoldExecutor();
  v1::StreamRequest call = driver_->DecodeCall(0, {seq_});
  {
    auto stream = client_->OpenStream(absl::Seconds(30));
    v1::StreamRequest copy = call;
    ASSERT_TRUE(stream->Send(&copy).ok());
    ASSERT_TRUE(Eventually([&] { return executor_->queued() >= 1; }));  // queued behind the hold
  }  // the session's destructor cancels the stream
  // The cancel reaches the server before a later call on the same channel, plus a margin.
  ASSERT_TRUE(client_->CheckHealth("liveness").ok());
  absl::SleepFor(absl::Milliseconds(100));
  release->Notify();
  ASSERT_TRUE(Eventually([&] { return executor_->queued() == 0; }));
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(Position(server_.get(), seq_->id()), 10);  // nothing was applied
  EXPECT_EQ(gate_->steps_run(), server_->engine()->options().model.num_layers);  // the prefill

  auto stream = client_->OpenStream(absl::Seconds(30));
  absl::StatusOr<v1::LayerOutput> out = stream->DecodeStep(std::move(*call.mutable_decode_step()));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_FALSE(out->replayed());
  EXPECT_EQ(out->positions(0), 11);
  ASSERT_OK(driver_->CheckDecodeAnswer(0, {seq_}, *out));
  ASSERT_OK(stream->Close());
  ASSERT_OK(driver_->Decode({seq_}));
  ASSERT_OK(driver_->Close({seq_}));
}

TEST_F(HeldServerTest, AStreamCancelledWhileItsCallRunsKeepsTheCallAndTheResendIsReplayed) {
  gate_->Close();
  v1::StreamRequest call = driver_->DecodeCall(0, {seq_});
  {
    auto stream = client_->OpenStream(absl::Seconds(30));
    v1::StreamRequest copy = call;
    ASSERT_TRUE(stream->Send(&copy).ok());
    ASSERT_TRUE(gate_->WaitForHeld(1, absl::Seconds(10)));  // the call is in the backend
  }                                                         // cancelled while running
  const int run_before = gate_->steps_run();
  gate_->Open();
  ASSERT_TRUE(Eventually([&] { return gate_->steps_run() == run_before + 1; }));
  EXPECT_EQ(Position(server_.get(), seq_->id()), 11);  // a running call completes

  auto stream = client_->OpenStream(absl::Seconds(30));
  absl::StatusOr<v1::LayerOutput> out = stream->DecodeStep(std::move(*call.mutable_decode_step()));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->replayed());  // answered from the replay record: applied exactly once
  EXPECT_EQ(out->positions(0), 11);
  EXPECT_EQ(gate_->steps_run(), run_before + 1);
  ASSERT_OK(driver_->CheckDecodeAnswer(0, {seq_}, *out));
  ASSERT_OK(stream->Close());
  ASSERT_OK(driver_->Decode({seq_}));
  ASSERT_OK(driver_->Close({seq_}));
}

TEST_F(HeldServerTest, ADeadlineThatPassesWhileTheCallRunsLeavesItAppliedOnceAndReplayable) {
  gate_->Close();
  v1::StreamRequest call = driver_->DecodeCall(0, {seq_});
  client::CallOptions opts;
  opts.timeout = absl::Milliseconds(1500);  // reaches the backend even on a loaded machine
  opts.max_attempts = 1;
  v1::LayerOutput out;
  absl::Status s;
  std::thread caller([&] { s = client_->DecodeStep(call.decode_step(), &out, opts); });
  ASSERT_TRUE(gate_->WaitForHeld(1, absl::Seconds(10)));
  caller.join();  // the client gives up while the server runs the call
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  const int run_before = gate_->steps_run();
  gate_->Open();
  ASSERT_TRUE(Eventually([&] { return gate_->steps_run() == run_before + 1; }));
  EXPECT_EQ(Position(server_.get(), seq_->id()), 11);

  // The client resends it unchanged (what its retry loop does): replayed, not applied again.
  int attempts = 0;
  opts.timeout = absl::Seconds(10);
  opts.attempts = &attempts;
  ASSERT_OK(client_->DecodeStep(call.decode_step(), &out, opts));
  EXPECT_EQ(attempts, 1);
  EXPECT_TRUE(out.replayed());
  EXPECT_EQ(out.positions(0), 11);
  EXPECT_EQ(gate_->steps_run(), run_before + 1);
  ASSERT_OK(driver_->CheckDecodeAnswer(0, {seq_}, out));
  ASSERT_OK(driver_->Decode({seq_}));
  ASSERT_OK(driver_->Close({seq_}));
}

TEST_F(HeldServerTest, ADeviceFailureInABatchChangesNoSequenceAndTheRetryMatches) {
  auto* other = driver_->NewSequence(62);
  ASSERT_OK(driver_->Open({other}));
  ASSERT_OK(driver_->Prefill({other}, {70}));
  const EngineInfo before = server_->engine()->Info();
  gate_->FailNextStep(absl::InternalError("injected device failure"));
  absl::Status s = driver_->Decode({seq_, other});
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("injected device failure"));
  const EngineInfo after = server_->engine()->Info();
  EXPECT_EQ(after.free_state_slots, before.free_state_slots);
  EXPECT_EQ(after.free_buffer_pages, before.free_buffer_pages);
  EXPECT_EQ(Position(server_.get(), seq_->id()), 10);
  EXPECT_EQ(Position(server_.get(), other->id()), 70);
  ASSERT_OK(driver_->Decode({seq_, other}));  // the same step again, now for real
  ASSERT_OK(driver_->Close({seq_, other}));
  ExpectPoolsWhole(server_.get(), options_);
}

TEST(FaultTest, AnAnswerLostWithItsStreamIsResentOnANewStreamAndReplayedExactlyOnce) {
  auto server = InProcessServer::Start();
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "unary", 9);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(71);
  auto* b = d.NewSequence(72);
  ASSERT_OK(d.Open({a, b}));
  ASSERT_OK(d.Prefill({a, b}, {18, 66}));
  auto client = client::Client::Connect(server->address());
  for (int32_t layer = 0; layer < d.config().num_layers; ++layer) {
    SCOPED_TRACE(layer);
    v1::StreamRequest call = d.DecodeCall(layer, {a, b});
    const int64_t pos = Position(server.get(), a->id(), layer);
    {
      auto stream = client->OpenStream(absl::Seconds(30));
      v1::StreamRequest copy = call;
      ASSERT_TRUE(stream->Send(&copy).ok());
      // Applied on the server; the stream breaks before its answer is read.
      ASSERT_TRUE(Eventually([&] { return Position(server.get(), a->id(), layer) == pos + 1; }));
    }
    auto stream = client->OpenStream(absl::Seconds(30));
    v1::StreamRequest resend = call;
    absl::StatusOr<v1::LayerOutput> out =
        stream->DecodeStep(std::move(*resend.mutable_decode_step()));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(out->replayed());
    EXPECT_EQ(out->positions(0), pos + 1);
    ASSERT_OK(d.CheckDecodeAnswer(layer, {a, b}, *out));
    // Resent once more (say the replayed answer was lost too): the same bytes again.
    resend = call;
    absl::StatusOr<v1::LayerOutput> again =
        stream->DecodeStep(std::move(*resend.mutable_decode_step()));
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(again->replayed());
    EXPECT_EQ(again->output().data(), out->output().data());
    ASSERT_OK(stream->Close());
  }
  ASSERT_OK(d.Decode({a, b}));  // every layer advanced exactly once
  ASSERT_OK(d.Close({a, b}));
}

TEST(FaultTest, AStatePoolExhaustedMidBatchChangesNoSequence) {
  EngineOptions e = SmallModelOptions();
  e.state_slots = 2;
  e.stateless_limit = 8;
  auto server = InProcessServer::Start(e);
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "stream", 13);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(1);
  auto* b = d.NewSequence(2);
  auto* c = d.NewSequence(3);
  auto* s = d.NewSequence(4);  // stays stateless
  ASSERT_OK(d.Open({a, b, c, s}));
  ASSERT_OK(d.Prefill({a}, {20}));  // takes one of the two state slots
  const EngineInfo before = server->engine()->Info();
  // b and c each need a state slot on layer 0; one is free: the whole batch is refused.
  absl::Status full = d.Prefill({s, b, c}, {3, 12, 12});
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_THAT(std::string(full.message()), HasSubstr("needs 2 new state slots, 1 free"));
  const EngineInfo after = server->engine()->Info();
  EXPECT_EQ(after.free_state_slots, before.free_state_slots);
  EXPECT_EQ(after.free_buffer_pages, before.free_buffer_pages);
  for (auto* seq : {s, b, c}) EXPECT_EQ(Position(server.get(), seq->id()), 0) << seq->id();
  ASSERT_OK(d.Decode({a}));  // the others were never touched
  ASSERT_OK(d.Prefill({s, b}, {3, 12}));
  EXPECT_EQ(d.Prefill({c}, {12}).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(d.Close({a}));
  ASSERT_OK(d.Prefill({c}, {12}));  // a's slot came back
  ASSERT_OK(d.Decode({s, b, c}));
  ASSERT_OK(d.Verify({s, b, c}, {2, 3, 1}));
  ASSERT_OK(d.Commit({s, b, c}, {1, 3, 0}));
  ASSERT_OK(d.Close({s, b, c}));
  ExpectPoolsWhole(server.get(), e);
}

TEST(FaultTest, ABufferPagePoolExhaustedMidBatchChangesNoSequence) {
  EngineOptions e = SmallModelOptions();
  e.buffer_pages = 7;
  e.page_tokens = 16;
  e.stateless_limit = 64;
  auto server = InProcessServer::Start(e);
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "unary", 14);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(1);
  auto* b = d.NewSequence(2);
  auto* c = d.NewSequence(3);
  ASSERT_OK(d.Open({a, b, c}));
  ASSERT_OK(d.Prefill({a}, {46}));  // 3 pages of 16 rows, stateless
  const EngineInfo before = server->engine()->Info();
  ASSERT_EQ(before.free_buffer_pages, 4);
  absl::Status full = d.Prefill({b, c}, {40, 40});  // 6 pages asked, 4 free
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_THAT(std::string(full.message()), HasSubstr("buffer page pool is full"));
  EXPECT_EQ(server->engine()->Info().free_buffer_pages, 4);
  EXPECT_EQ(Position(server.get(), b->id()), 0);
  EXPECT_EQ(Position(server.get(), c->id()), 0);
  ASSERT_OK(d.Prefill({b}, {40}));
  // Drafts need pages too: a window that does not fit is refused whole, then fits after a close.
  ASSERT_OK(d.Prefill({c}, {15}));                 // c: 1 page; 0 free now
  ASSERT_OK(d.Decode({c}));                        // 16 rows: still 1 page
  absl::Status drafts = d.Verify({a, c}, {4, 1});  // a needs a 4th page, c a 2nd
  EXPECT_EQ(drafts.code(), absl::StatusCode::kResourceExhausted) << drafts;
  EXPECT_EQ(Position(server.get(), a->id()), 46);
  ASSERT_OK(d.Close({b}));
  ASSERT_OK(d.Verify({a, c}, {4, 1}));
  ASSERT_OK(d.Commit({a, c}, {4, 1}));
  ASSERT_OK(d.Decode({a, c}));
  ASSERT_OK(d.Close({a, c}));
  ExpectPoolsWhole(server.get(), e);
}

TEST(DrainTest, ShutdownFlushesEveryOpenSequenceAndLeavesPendingDraftsAsTheyAre) {
  EngineOptions e = SmallModelOptions();
  auto server = InProcessServer::Start(e);
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "stream", 15);
  ASSERT_OK(d.Init());
  auto* buffered = d.NewSequence(11);  // stateless, rows buffered
  auto* stateful = d.NewSequence(12);  // a state and a buffer tail
  auto* drafts = d.NewSequence(13);    // drafts pending
  auto* idle = d.NewSequence(14);      // nothing buffered
  ASSERT_OK(d.Open({buffered, stateful, drafts, idle}));
  ASSERT_OK(d.Prefill({buffered, stateful, drafts}, {20, 70, 9}));
  ASSERT_OK(d.Decode({buffered, stateful, drafts}));
  ASSERT_OK(d.Verify({drafts}, {3}));
  ASSERT_OK(d.CloseTransport());
  server->server()->Shutdown(absl::Seconds(5));
  const server::DrainReport report = server->server()->drain_report();
  EXPECT_EQ(report.open, 4);
  EXPECT_EQ(report.flushed, 2);
  EXPECT_EQ(report.clean, 1);
  ASSERT_EQ(report.pending_drafts.size(), 1u);
  EXPECT_EQ(report.pending_drafts[0].id, 13u);
  EXPECT_TRUE(report.failed.empty());
  EXPECT_THAT(server::FormatDrainReport(report),
              HasSubstr("2 flushed, 1 had nothing buffered, 1 left with pending drafts, 0 failed; "
                        "pending drafts: tenant \"\" id 13"));
  for (uint64_t id : {11, 12}) {
    absl::StatusOr<SequenceInfo> info = server->engine()->Describe("", id);
    ASSERT_TRUE(info.ok());
    EXPECT_TRUE(info->has_state) << id;      // folded into a state...
    EXPECT_EQ(info->buffer_pages, 0) << id;  // ...and nothing left buffered
    EXPECT_EQ(info->positions[0], id == 11 ? 21 : 71);
  }
  absl::StatusOr<SequenceInfo> pending = server->engine()->Describe("", 13);
  ASSERT_TRUE(pending.ok());
  EXPECT_EQ(pending->pending_drafts, 3);
  EXPECT_FALSE(pending->has_state);
  EXPECT_GT(pending->buffer_pages, 0);
}

TEST(DrainTest, SigtermDuringLoadFinishesInFlightStreamsFlushesAndExitsZero) {
  absl::StatusOr<std::unique_ptr<ChildServer>> started = ChildServer::Start(
      {"--model=small", "--drain_grace_seconds=1", "--shutdown_timeout_seconds=60"});
  ASSERT_TRUE(started.ok()) << started.status();
  ChildServer& server = **started;
  constexpr int kWorkers = 4;
  std::atomic<bool> sigterm_sent{false};
  std::atomic<int> ready{0};
  std::atomic<int> steps_after_sigterm{0};
  std::vector<std::string> errors(kWorkers);
  std::vector<double> max_error(kWorkers, 0);
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      WireDriver d(server.address(), "stream", 100 + w);
      bool counted = false;
      auto mark_ready = [&] {
        if (!counted) ++ready;
        counted = true;
      };
      auto fail = [&](const std::string& what, const absl::Status& s) {
        errors[w] = absl::StrCat("worker ", w, ": ", what, ": ", s.ToString());
        mark_ready();  // never keep the main thread waiting
      };
      if (absl::Status s = d.Init(); !s.ok()) return fail("init", s);
      auto* x = d.NewSequence(1000 + 2 * w);
      auto* y = d.NewSequence(1001 + 2 * w);
      if (absl::Status s = d.Open({x, y}); !s.ok()) return fail("open", s);
      if (absl::Status s = d.Prefill({x, y}, {7 + w, 65 + w}); !s.ok()) return fail("prefill", s);
      mark_ready();
      // Step until the signal, then six more steps on the same (in-flight) Stream.
      int after = 0;
      for (int step = 0; after < 6; ++step) {
        if (sigterm_sent.load()) ++after;
        absl::Status s = step % 3 == 2 ? d.Verify({x, y}, {2, 3}) : d.Decode({x, y});
        if (s.ok() && step % 3 == 2) s = d.Commit({x, y}, {1, 3});
        if (!s.ok()) return fail(absl::StrCat("step ", step), s);
      }
      steps_after_sigterm += after;
      // New sequences are refused while draining, on the same Stream.
      auto* z = d.NewSequence(5000 + w);
      absl::Status refused = d.Open({z});
      if (refused.code() != absl::StatusCode::kUnavailable) {
        return fail("open while draining", refused);
      }
      // Worker 0 leaves drafts pending; the others leave rows buffered.
      if (absl::Status s = w == 0 ? d.Verify({x, y}, {2, 2}) : d.Decode({x, y}); !s.ok()) {
        return fail("last step", s);
      }
      if (absl::Status s = d.CloseTransport(); !s.ok()) return fail("closing the stream", s);
      max_error[w] = d.max_error();
    });
  }
  // Signal in the middle of the load.
  auto probe = client::Client::Connect(server.address());
  EXPECT_TRUE(probe->CheckHealth("readiness").ok());  // connected before the signal
  EXPECT_TRUE(Eventually([&] { return ready.load() == kWorkers; }, absl::Seconds(60)));
  absl::SleepFor(absl::Milliseconds(100));
  server.Signal(SIGTERM);
  sigterm_sent = true;
  absl::StatusOr<client::ServingStatus> readiness;
  EXPECT_TRUE(Eventually([&] {
    readiness = probe->CheckHealth("readiness");
    return !readiness.ok() || *readiness != grpc::health::v1::HealthCheckResponse::SERVING;
  }));
  EXPECT_TRUE(readiness.ok()) << readiness.status();
  if (readiness.ok()) {
    EXPECT_EQ(*readiness, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  }
  for (std::thread& t : workers) t.join();
  for (const std::string& e : errors) EXPECT_EQ(e, "");
  for (double err : max_error) EXPECT_LE(err, 1e-5);
  EXPECT_EQ(steps_after_sigterm.load(), 6 * kWorkers);

  absl::StatusOr<int> code = server.WaitExit(absl::Seconds(30));
  ASSERT_TRUE(code.ok()) << code.status() << "\n" << server.Stderr();
  EXPECT_EQ(*code, 0) << server.Stderr();
  const std::string log = server.Stderr();
  EXPECT_THAT(log, HasSubstr("SIGTERM: draining"));
  EXPECT_THAT(log, HasSubstr("drain flush: 8 open sequence(s): 6 flushed, 0 had nothing "
                             "buffered, 2 left with pending drafts, 0 failed"));
  EXPECT_THAT(log, HasSubstr("tenant \"\" id 1000"));
  EXPECT_THAT(log, HasSubstr("tenant \"\" id 1001"));
}

}  // namespace
}  // namespace kvbuffer::testing
