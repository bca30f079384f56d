// kvbuffer-server and kvbuffer-mock-worker as processes: health and reflection answer, the mock
// worker's default session passes, bad flags fail fast, and SIGTERM drains and exits 0 while an
// in-flight Stream completes.
#include <signal.h>

#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::HasSubstr;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

TEST(ProcessTest, HealthAndReflectionAnswer) {
  absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start({"--model=tiny"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = client::Client::Connect((*server)->address());
  for (const char* name : {"", "liveness", "readiness", "kvbuffer.v1.AttentionService"}) {
    absl::StatusOr<client::ServingStatus> s = client->CheckHealth(name);
    ASSERT_TRUE(s.ok()) << name << ": " << s.status();
    EXPECT_EQ(*s, HealthResponse::SERVING) << name;
  }
  absl::StatusOr<client::ServingStatus> unknown = client->CheckHealth("no.such.Service");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();

  // Reflection: list the services, then fetch the descriptor of ours.
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(client->channel());
  grpc::ClientContext context;
  auto stream = stub->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("*");
  ASSERT_TRUE(stream->Write(request));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::set<std::string> services;
  for (const auto& s : response.list_services_response().service()) services.insert(s.name());
  EXPECT_TRUE(services.count("kvbuffer.v1.AttentionService")) << response.DebugString();
  EXPECT_TRUE(services.count("grpc.health.v1.Health")) << response.DebugString();
  EXPECT_TRUE(services.count("grpc.reflection.v1alpha.ServerReflection"));

  request.set_file_containing_symbol("kvbuffer.v1.AttentionService");
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_EQ(response.message_response_case(),
            grpc::reflection::v1alpha::ServerReflectionResponse::kFileDescriptorResponse)
      << response.DebugString();
  bool found = false;
  for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(bytes));
    if (file.name() != "kvbuffer/v1/attention_service.proto") continue;
    found = true;
    ASSERT_EQ(file.service_size(), 1);
    std::set<std::string> methods;
    for (const auto& m : file.service(0).method()) methods.insert(m.name());
    EXPECT_EQ(methods, (std::set<std::string>{"GetServerInfo", "OpenSequences", "CloseSequences",
                                              "Prefill", "DecodeStep", "VerifyDrafts",
                                              "CommitDrafts", "Flush", "Stream"}));
  }
  EXPECT_TRUE(found);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(ProcessTest, MockWorkerDefaultSessionPassesInBothModes) {
  absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start({"--model=small"});
  ASSERT_TRUE(server.ok()) << server.status();
  for (const std::string mode : {"", "--mode=stream"}) {
    std::vector<std::string> argv = {MockWorkerBinary(), "--server=" + (*server)->address()};
    if (!mode.empty()) argv.push_back(mode);
    std::string out;
    absl::StatusOr<int> code = RunProgram(argv, &out, absl::Seconds(60));
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_EQ(*code, 0) << out;
    EXPECT_THAT(out, HasSubstr("kvbuffer-mock-worker: PASS"));
    EXPECT_THAT(out, HasSubstr("0 mismatch(es)"));
    EXPECT_THAT(out, HasSubstr("backend cpu, model small"));
    EXPECT_THAT(out, HasSubstr("p99 ms"));
    EXPECT_THAT(out, HasSubstr("memory      pool"));
  }
}

TEST(ProcessTest, MockWorkerExitsNonZeroOnMismatch) {
  absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start({"--model=tiny"});
  ASSERT_TRUE(server.ok()) << server.status();
  // BF16 outputs cannot meet a 1e-9 tolerance: every check is a mismatch.
  std::string out;
  absl::StatusOr<int> code =
      RunProgram({MockWorkerBinary(), "--server=" + (*server)->address(), "--output_dtype=bf16",
                  "--tolerance=1e-9", "--sequences=2", "--steps=2"},
                 &out, absl::Seconds(60));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 1) << out;
  EXPECT_THAT(out, HasSubstr("kvbuffer-mock-worker: FAIL"));
  EXPECT_THAT(out, HasSubstr("MISMATCH"));
}

TEST(ProcessTest, BadFlagsFailFastWithAMessage) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--model=nope"}, "--model is \"nope\""},
      {{"--model=tiny", "--max_drafts=32", "--flush_interval=16"}, "max_drafts"},
      {{"--model=tiny", "--buffer_dtype=fp8"}, "--buffer_dtype is \"fp8\""},
      {{"--config=/no/such/file"}, "cannot read /no/such/file"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start(c.args);
    ASSERT_FALSE(server.ok());
    EXPECT_THAT(std::string(server.status().message()), HasSubstr(c.message));
  }
}

TEST(ProcessTest, ConfigFileSetsTheModel) {
  const std::string path = ::testing::TempDir() + "/kvb_model.json";
  {
    std::ofstream f(path);
    f << R"({"model_type": "qwen3_next", "num_hidden_layers": 4, "full_attention_interval": 4,
             "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
             "linear_value_head_dim": 16, "linear_conv_kernel_dim": 3,
             "rope_scaling": null, "layer_types": ["linear_attention", "full_attention"]})";
  }
  absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start({"--config=" + path});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = client::Client::Connect((*server)->address());
  absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().name(), "qwen3_next");
  EXPECT_EQ(info->model().num_layers(), 3);
  EXPECT_EQ(info->model().num_v_heads(), 4);
  EXPECT_EQ(info->model().head_k_dim(), 8);
  EXPECT_EQ(info->model().head_v_dim(), 16);
  EXPECT_EQ(info->model().conv_width(), 3);
  EXPECT_EQ(info->model().channels(), 2 * 2 * 8 + 4 * 16);
  // And it serves that model correctly.
  std::string out;
  absl::StatusOr<int> code = RunProgram(
      {MockWorkerBinary(), "--server=" + (*server)->address(), "--sequences=3", "--steps=8"}, &out,
      absl::Seconds(60));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << out;
}

TEST(ProcessTest, SigtermDrainsFinishesInFlightCallsAndExitsZero) {
  absl::StatusOr<std::unique_ptr<ChildServer>> started =
      ChildServer::Start({"--model=small", "--drain_grace_seconds=1"});
  ASSERT_TRUE(started.ok()) << started.status();
  ChildServer& server = **started;
  // An in-flight call: a Stream with an open, prefilled sequence.
  WireDriver d(server.address(), "stream", 12);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(81);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {40}));
  auto probe = client::Client::Connect(server.address());

  server.Signal(SIGTERM);
  // Readiness goes NOT_SERVING; liveness stays SERVING; new sequences are refused.
  absl::StatusOr<client::ServingStatus> ready;
  const absl::Time until = absl::Now() + absl::Seconds(5);
  do {
    ready = probe->CheckHealth("readiness");
  } while (ready.ok() && *ready == HealthResponse::SERVING && absl::Now() < until);
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_EQ(*ready, HealthResponse::NOT_SERVING);
  absl::StatusOr<client::ServingStatus> live = probe->CheckHealth("liveness");
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_EQ(*live, HealthResponse::SERVING);
  const uint64_t id = 82;
  client::CallOptions once;
  once.max_attempts = 1;
  absl::Status refused = probe->OpenSequences({&id, 1}, once);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_THAT(std::string(refused.message()), HasSubstr("draining"));

  // After the grace period the listener closes: new connections are refused...
  absl::Status closed;
  const absl::Time until_closed = absl::Now() + absl::Seconds(10);
  do {
    absl::SleepFor(absl::Milliseconds(50));
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
    client::Client fresh(
        grpc::CreateCustomChannel(server.address(), grpc::InsecureChannelCredentials(), args));
    closed = fresh.GetServerInfo({}, once).status();
    // A connection caught while the listener shuts down may end CANCELLED: look again.
  } while (closed.code() != absl::StatusCode::kUnavailable && absl::Now() < until_closed);
  EXPECT_EQ(closed.code(), absl::StatusCode::kUnavailable) << closed;
  // ...while the in-flight Stream is still served, correctly, to its end.
  ASSERT_OK(d.Decode({a}));
  ASSERT_OK(d.Verify({a}, {3}));
  ASSERT_OK(d.Commit({a}, {1}));
  ASSERT_OK(d.Flush({a}));
  ASSERT_OK(d.Close({a}));
  ASSERT_OK(d.CloseTransport());

  absl::StatusOr<int> code = server.WaitExit(absl::Seconds(20));
  ASSERT_TRUE(code.ok()) << code.status() << "\n" << server.Stderr();
  EXPECT_EQ(*code, 0) << server.Stderr();
  EXPECT_THAT(server.Stderr(), HasSubstr("SIGTERM: draining"));
}

}  // namespace
}  // namespace kvbuffer::testing
