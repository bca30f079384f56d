// Tensor parallelism through the whole server (issue 5), on the CPU: kvbuffer-server with
// --tensor_parallel=2 --tp_mode=simulated (heads sharded over two CPU shards) serves mock workers
// in unary and Stream mode with no mismatch, reports tensor_parallel_size 2 and answers
// DecodeStep bit for bit like a TP = 1 server; tensor-parallel flags that cannot work fail fast;
// a tensor-parallel group that breaks (rank protocol over the in-process transport) turns every
// health name NOT_SERVING and its calls into errors, never a hang.
#include <atomic>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/mock_worker/mock_session.h"
#include "client/mock_worker/session_report.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/engine/cpu_backend.h"
#include "service/parallel/local_transport.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/tp_backend.h"
#include "service/parallel/tp_worker.h"
#include "service/server/backend_factory.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::AnyOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

const std::vector<std::string> kSimulatedTp2 = {"--model=small", "--tensor_parallel=2",
                                                "--tp_mode=simulated"};

void ExpectCleanSession(const absl::StatusOr<mock::MockSessionReport>& report) {
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << mock::FormatReport(*report);
  EXPECT_EQ(report->mismatches, 0);
  EXPECT_EQ(report->first_error, "");
  EXPECT_EQ(report->sequences, 16);
  EXPECT_GT(report->decode_tokens, 0);
  EXPECT_GT(report->drafts_verified, 0);
  EXPECT_GT(report->flushes, 0);
  EXPECT_GT(report->checks, 100);
  // CPU shards compute exactly like one CPU backend: the CPU tolerance applies.
  EXPECT_DOUBLE_EQ(report->tolerance, 1e-5);
  EXPECT_LE(report->max_relative_error, report->tolerance);
}

TEST(TensorParallelTest, SimulatedTp2ServesUnaryAndStreamMockWorkers) {
  absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start(kSimulatedTp2);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_THAT((*server)->Stderr(), HasSubstr("tensor parallel 2 (simulated)"));
  auto client = client::Client::Connect((*server)->address());
  absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->tensor_parallel_size(), 2);
  EXPECT_EQ(info->backend(), "cpu-tp2");
  EXPECT_THAT(info->features(), Contains("tensor_parallel"));
  EXPECT_EQ(info->model().num_k_heads(), 4);  // the whole model, not a shard

  mock::MockSessionOptions unary;
  unary.server = (*server)->address();
  unary.mode = "unary";
  unary.concurrency = 2;
  unary.sequences = 8;
  unary.steps = 16;
  unary.max_prompt = 100;
  unary.seed = 21;
  mock::MockSessionOptions stream = unary;
  stream.mode = "stream";
  stream.seed = 22;
  absl::StatusOr<mock::MockSessionReport> unary_report, stream_report;
  std::thread t([&] { unary_report = mock::RunMockSession(unary); });
  stream_report = mock::RunMockSession(stream);
  t.join();
  ExpectCleanSession(unary_report);
  ExpectCleanSession(stream_report);

  info = client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->capacity().open_sequences(), 0);
  EXPECT_EQ(info->capacity().free_state_slots(), info->capacity().state_slots());
  EXPECT_EQ(info->capacity().free_buffer_pages(), info->capacity().buffer_pages());
  EXPECT_GT(info->counters().flushes(), 0);
}

// DecodeStep outputs of one sequence over every layer, through a fold, as raw bytes.
std::vector<std::string> DecodeOutputs(const std::string& address, std::string* error) {
  WireDriver d(address, "unary", /*seed=*/9);
  std::vector<std::string> out;
  auto fail = [&](const absl::Status& s) {
    *error = s.ToString();
    return out;
  };
  if (absl::Status s = d.Init(); !s.ok()) return fail(s);
  mock::CheckedSequence* a = d.NewSequence(77);
  if (absl::Status s = d.Open({a}); !s.ok()) return fail(s);
  // Past the stateless limit (64), so the sequence holds a state that decoding folds into.
  if (absl::Status s = d.Prefill({a}, {80}); !s.ok()) return fail(s);
  for (int step = 0; step < 20; ++step) {
    for (int32_t layer = 0; layer < d.config().num_layers; ++layer) {
      v1::StreamResponse r = d.Run(d.DecodeCall(layer, {a}));
      if (r.status_code() != 0) return fail(absl::InternalError(r.status_message()));
      out.push_back(r.layer_output().output().data());
      if (absl::Status s = d.CheckDecodeAnswer(layer, {a}, r.layer_output()); !s.ok()) {
        return fail(s);
      }
    }
  }
  return out;
}

TEST(TensorParallelTest, SimulatedTp2DecodesBitForBitLikeTp1) {
  absl::StatusOr<std::unique_ptr<ChildServer>> tp1 = ChildServer::Start({"--model=small"});
  ASSERT_TRUE(tp1.ok()) << tp1.status();
  absl::StatusOr<std::unique_ptr<ChildServer>> tp2 = ChildServer::Start(kSimulatedTp2);
  ASSERT_TRUE(tp2.ok()) << tp2.status();
  std::string error1, error2;
  const std::vector<std::string> want = DecodeOutputs((*tp1)->address(), &error1);
  const std::vector<std::string> got = DecodeOutputs((*tp2)->address(), &error2);
  ASSERT_EQ(error1, "");
  ASSERT_EQ(error2, "");
  ASSERT_EQ(want.size(), 20u * 4);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_FALSE(want[i].empty());
    EXPECT_EQ(got[i], want[i]) << "call " << i << " (step " << i / 4 << ", layer " << i % 4 << ")";
  }
}

TEST(TensorParallelTest, UnusableTensorParallelFlagsFailFast) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--model=tiny", "--tensor_parallel=3", "--tp_mode=simulated"},
       "--tensor_parallel=3 does not divide the model's 2 key heads"},
      {{"--model=tiny", "--tensor_parallel=0"}, "--tensor_parallel must be in [1, 64]"},
      {{"--model=tiny", "--tensor_parallel=2", "--tp_mode=ring"}, "--tp_mode is \"ring\""},
      {{"--model=tiny", "--tensor_parallel=2", "--tp_mode=threads", "--tp_devices=0,x"},
       "--tp_devices is \"0,x\""},
      // ChildServer passes --backend=cpu: GPU modes refuse it.
      {{"--model=tiny", "--tensor_parallel=2", "--tp_mode=threads"}, "use cuda or auto"},
      {{"--model=tiny", "--tensor_parallel=2", "--tp_mode=simulated", "--backend=cuda"},
       "runs CPU shards"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start(c.args);
    ASSERT_FALSE(server.ok()) << c.message;
    EXPECT_THAT(std::string(server.status().message()), HasSubstr(c.message));
  }
}

TEST(TensorParallelTest, GpuModesWithoutNcclOrGpusFailWithFailedPrecondition) {
  for (const char* mode : {"--tp_mode=threads", "--tp_mode=processes"}) {
    absl::StatusOr<std::unique_ptr<ChildServer>> server =
        ChildServer::Start({"--backend=auto", "--model=tiny", "--tensor_parallel=2", mode,
                            "--tp_bootstrap=127.0.0.1:0", "--tp_init_timeout_seconds=5"});
    const std::string message(server.status().message());
    if (server.ok() || (server::BuiltWithNccl() && !absl::StrContains(message, "visible"))) {
      GTEST_SKIP() << "this host has GPUs for a tensor-parallel group: " << message;
    }
    EXPECT_THAT(message, HasSubstr("FAILED_PRECONDITION")) << mode;
    EXPECT_THAT(message,
                HasSubstr(server::BuiltWithNccl() ? "GPU(s) visible" : "this build has no NCCL"))
        << mode;
  }
}

// A CPU backend whose steps fail on demand (a rank whose GPU is lost).
class FailingBackend : public Backend {
 public:
  explicit FailingBackend(std::atomic<bool>* fail) : inner_(MakeCpuBackend()), fail_(fail) {}
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
  std::atomic<bool>* fail_;
};

TEST(TensorParallelTest, BrokenGroupTurnsEveryHealthNameNotServing) {
  parallel::TpOptions options;
  options.command_bytes = 4 << 10;
  options.op_timeout = absl::Seconds(2);
  options.heartbeat_interval = absl::Milliseconds(50);
  options.idle_timeout = absl::Seconds(3);
  std::vector<std::unique_ptr<parallel::TpTransport>> transports = parallel::MakeLocalTransports(2);
  std::atomic<bool> fail{false};
  std::unique_ptr<parallel::ShardCompute> rank1 =
      parallel::MakeInPlaceShardCompute(std::make_unique<FailingBackend>(&fail));
  absl::Status worker_result;
  std::thread worker([&, t = transports[1].get(), opts = options] {
    worker_result = parallel::RunTpWorker(*t, *rank1, opts);
  });
  // What server_main does: the group reports to a relay, the relay to the server's health.
  server::BrokenGroupRelay relay;
  options.on_broken = [&relay](const absl::Status& why) { relay.Report(why); };
  absl::StatusOr<std::unique_ptr<parallel::TpBackend>> leader = parallel::TpBackend::Create(
      std::move(transports[0]), parallel::MakeInPlaceShardCompute(MakeCpuBackend()), options);
  ASSERT_TRUE(leader.ok()) << leader.status();
  std::unique_ptr<InProcessServer> server =
      InProcessServer::Start(SmallModelOptions(), {}, nullptr, *std::move(leader));
  ASSERT_NE(server, nullptr);
  relay.Attach([s = server->server()](const absl::Status& why) { s->MarkUnhealthy(why); });

  auto client = client::Client::Connect(server->address());
  auto health = [&](const char* name) {
    absl::StatusOr<client::ServingStatus> s = client->CheckHealth(name);
    return s.ok() ? *s : HealthResponse::UNKNOWN;
  };
  WireDriver d(server->address(), "unary", 4);
  ASSERT_OK(d.Init());
  mock::CheckedSequence* a = d.NewSequence(5);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {12}));
  ASSERT_OK(d.Decode({a}));  // the group works through the server, outputs checked
  for (const char* name : {"", "liveness", "readiness", "kvbuffer.v1.AttentionService"}) {
    EXPECT_EQ(health(name), HealthResponse::SERVING) << name;
  }

  fail = true;  // rank 1 fails its steps, rank 0 does not: the ranks disagree
  const absl::Status broken = d.Decode({a});
  EXPECT_FALSE(broken.ok());
  EXPECT_FALSE(relay.status().ok());
  for (const char* name : {"", "liveness", "readiness", "kvbuffer.v1.AttentionService"}) {
    EXPECT_EQ(health(name), HealthResponse::NOT_SERVING) << name;
  }
  // Later calls fail at once; GetServerInfo still answers.
  fail = false;
  const absl::Status after = d.Decode({a});
  EXPECT_THAT(after.code(), AnyOf(absl::StatusCode::kUnavailable, absl::StatusCode::kInternal))
      << after;
  EXPECT_TRUE(client->GetServerInfo().ok());

  relay.Attach(nullptr);
  server.reset();
  worker.join();
  EXPECT_FALSE(worker_result.ok());  // rank 1 saw the group fail
}

TEST(TensorParallelTest, RelayDeliversABreakReportedBeforeTheServerExists) {
  server::BrokenGroupRelay relay;
  EXPECT_TRUE(relay.status().ok());
  relay.Report(absl::UnavailableError("rank 1 silent"));
  relay.Report(absl::InternalError("second report is ignored"));
  std::vector<absl::Status> seen;
  relay.Attach([&seen](const absl::Status& why) { seen.push_back(why); });
  relay.Attach([&seen](const absl::Status& why) { seen.push_back(why); });  // delivered once
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(relay.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace kvbuffer::testing
