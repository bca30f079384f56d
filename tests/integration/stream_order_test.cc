// The Stream answers calls strictly in order, one answer per call echoing its request_id, with
// errors per call (the stream survives them), also when the client sends far more calls ahead
// than the server's read-ahead window.
#include <memory>
#include <string>
#include <vector>

#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/mock_worker/layer_calls.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
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

TEST(StreamOrderTest, PipelinedCallsAreAnsweredInOrderBeyondTheWindow) {
  server::ServerOptions options;
  options.stream_window = 2;
  auto server = InProcessServer::Start(SmallModelOptions(), options);
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "unary", 21);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(91);
  auto* b = d.NewSequence(92);
  const Seqs ab = {a, b};
  ASSERT_OK(d.Open(ab));
  ASSERT_OK(d.Prefill(ab, {6, 66}));
  const int32_t L = d.config().num_layers;

  // Three decode steps on every layer, an invalid call after the first, a GetServerInfo at the
  // end: all sent before any answer is read.
  constexpr int kSteps = 3;
  std::vector<std::unique_ptr<mock::LayerCalls>> steps;
  std::vector<v1::StreamRequest> calls;
  const int64_t base = a->position(0);
  for (int k = 0; k < kSteps; ++k) {
    steps.push_back(
        std::make_unique<mock::LayerCalls>(d.config(), DType::kBFloat16, DType::kFloat32, 100 + k));
    for (int32_t layer = 0; layer < L; ++layer) {
      v1::StreamRequest call;
      steps[k]->Fill(layer, ab, {1, 1}, call.mutable_decode_step());
      call.mutable_decode_step()->mutable_sequences(0)->set_position(base + k);
      call.mutable_decode_step()->mutable_sequences(1)->set_position(b->position(0) + k);
      calls.push_back(std::move(call));
    }
    if (k == 0) {
      v1::StreamRequest bad = calls.back();
      bad.mutable_decode_step()->set_layer(99);
      calls.push_back(std::move(bad));
    }
  }
  calls.emplace_back().mutable_get_server_info();

  auto client = client::Client::Connect(server->address());
  auto session = client->OpenStream(absl::Seconds(60));
  std::vector<uint64_t> ids;
  for (v1::StreamRequest& call : calls) {
    absl::StatusOr<uint64_t> id = session->Send(&call);
    ASSERT_TRUE(id.ok()) << id.status();
    ids.push_back(*id);
  }
  EXPECT_EQ(session->unanswered(), static_cast<int64_t>(calls.size()));

  size_t i = 0;
  for (int k = 0; k < kSteps; ++k) {
    for (int32_t layer = 0; layer < L; ++layer, ++i) {
      v1::StreamResponse r;
      ASSERT_TRUE(session->Receive(&r).ok());
      EXPECT_EQ(r.request_id(), ids[i]);
      ASSERT_EQ(r.status_code(), 0) << r.status_message();
      std::vector<double> errors;
      ASSERT_TRUE(
          steps[k]
              ->Check(mock::LayerKind::kDecode, layer, ab, {1, 1}, r.layer_output(), &errors)
              .ok());
      EXPECT_LE(errors[0], 1e-5);
      EXPECT_LE(errors[1], 1e-5);
    }
    if (k == 0) {
      v1::StreamResponse r;
      ASSERT_TRUE(session->Receive(&r).ok());
      EXPECT_EQ(r.request_id(), ids[i++]);
      EXPECT_EQ(r.status_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
      EXPECT_THAT(r.status_message(), HasSubstr("got 99"));
      EXPECT_FALSE(r.has_layer_output());
    }
  }
  v1::StreamResponse info;
  ASSERT_TRUE(session->Receive(&info).ok());
  EXPECT_EQ(info.request_id(), ids[i]);
  EXPECT_EQ(info.get_server_info().capacity().open_sequences(), 2);
  EXPECT_TRUE(session->Close().ok());
  ASSERT_OK(d.Decode(ab));  // the oracles advanced by exactly kSteps tokens
}

TEST(StreamOrderTest, ClosingWithUnansweredCallsIsReported) {
  auto server = InProcessServer::Start();
  ASSERT_NE(server, nullptr);
  auto client = client::Client::Connect(server->address());
  auto session = client->OpenStream(absl::Seconds(30));
  v1::StreamRequest call;
  call.mutable_get_server_info();
  ASSERT_TRUE(session->Send(&call).ok());
  absl::Status s = session->Close();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("1 call(s) unanswered"));
}

}  // namespace
}  // namespace kvbuffer::testing
