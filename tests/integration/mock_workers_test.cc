// Several concurrent mock workers, unary and on Streams, against one server: every output of
// every call matches the fp64 oracle, across flush boundaries, stateless sequences, draft windows
// with random acceptance, flushes and closes.
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/mock_worker/mock_session.h"
#include "client/mock_worker/session_report.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"

namespace kvbuffer::testing {
namespace {

struct ServerVariant {
  std::string name;
  int32_t flush_interval;
  int32_t stateless_limit;
  int32_t max_drafts;
  DType buffer_dtype;
  std::string model = "small";  // preset, or "wide": Qwen3-Next head sizes on few heads
};

class MockWorkersTest : public ::testing::TestWithParam<ServerVariant> {};

// Runs `options` and checks that the session did real work and matched the oracle throughout.
void ExpectCleanSession(const absl::StatusOr<mock::MockSessionReport>& report, int64_t sequences,
                        bool expect_short_prompts) {
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << mock::FormatReport(*report);
  EXPECT_EQ(report->mismatches, 0);
  EXPECT_EQ(report->first_error, "");
  EXPECT_EQ(report->sequences, sequences);
  if (expect_short_prompts) {
    EXPECT_GT(report->short_prompts, 0);
  }
  EXPECT_GT(report->decode_tokens, 0);
  EXPECT_GT(report->drafts_verified, 0);
  EXPECT_GT(report->flushes, 0);
  EXPECT_GT(report->checks, 100);
  EXPECT_LE(report->max_relative_error, report->tolerance);
  EXPECT_GT(report->max_relative_error, 0);  // outputs are computed, not copied from the oracle
}

TEST_P(MockWorkersTest, ConcurrentUnaryAndStreamWorkersMatchTheOracle) {
  const ServerVariant& v = GetParam();
  EngineOptions o = SmallModelOptions();
  if (v.model == "wide") {
    o.model.name = "wide";
    o.model.num_layers = 2;
    o.model.num_k_heads = 1;
    o.model.num_v_heads = 2;
    o.model.head_k_dim = 128;
    o.model.head_v_dim = 128;
  }
  o.flush_interval = v.flush_interval;
  o.stateless_limit = v.stateless_limit;
  o.max_drafts = v.max_drafts;
  o.buffer_dtype = v.buffer_dtype;
  auto server = InProcessServer::Start(o);
  ASSERT_NE(server, nullptr);

  mock::MockSessionOptions unary;
  unary.server = server->address();
  unary.mode = "unary";
  unary.concurrency = 2;
  unary.sequences = 8;
  unary.steps = 16;
  unary.max_prompt = 100;
  unary.seed = 5;
  mock::MockSessionOptions stream = unary;
  stream.mode = "stream";
  stream.seed = 6;

  absl::StatusOr<mock::MockSessionReport> unary_report, stream_report;
  std::thread t([&] { unary_report = mock::RunMockSession(unary); });
  stream_report = mock::RunMockSession(stream);
  t.join();
  ExpectCleanSession(unary_report, 16, v.stateless_limit > 1);
  ExpectCleanSession(stream_report, 16, v.stateless_limit > 1);
  if (v.buffer_dtype == DType::kFloat32) {
    EXPECT_DOUBLE_EQ(unary_report->tolerance, 1e-5);
  }

  // Every sequence was closed; the pools are whole again.
  auto client = client::Client::Connect(server->address());
  absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->capacity().open_sequences(), 0);
  EXPECT_EQ(info->capacity().free_state_slots(), o.state_slots);
  EXPECT_EQ(info->capacity().free_buffer_pages(), o.buffer_pages);
  EXPECT_GT(info->counters().flushes(), 0);
  EXPECT_GT(info->counters().drafts_accepted(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Settings, MockWorkersTest,
    ::testing::Values(ServerVariant{"defaults", 16, 64, 16, DType::kFloat32},
                      ServerVariant{"short_buffers", 4, 0, 4, DType::kFloat32},
                      ServerVariant{"bf16_buffers", 8, 16, 8, DType::kBFloat16},
                      ServerVariant{"head_dim_128", 16, 32, 8, DType::kFloat32, "wide"}),
    [](const auto& info) { return info.param.name; });

TEST(MockWorkersTest, PlayingFewerLayersDecodesOnly) {
  auto server = InProcessServer::Start();
  ASSERT_NE(server, nullptr);
  mock::MockSessionOptions o;
  o.server = server->address();
  o.layers = 2;
  o.concurrency = 1;
  o.sequences = 4;
  o.steps = 6;
  absl::StatusOr<mock::MockSessionReport> report = mock::RunMockSession(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << mock::FormatReport(*report);
  EXPECT_EQ(report->layers_played, 2);
  EXPECT_EQ(report->drafts_verified, 0);  // CommitDrafts needs every layer verified
  EXPECT_GT(report->decode_tokens, 0);
}

}  // namespace
}  // namespace kvbuffer::testing
