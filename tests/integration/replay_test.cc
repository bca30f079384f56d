// Exactly-once per token over the wire: a call sent twice is applied once and answered twice
// (the second answer replayed, bit for bit), and the client's retries after a lost answer are safe.
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/cpp/tensor_builder.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/client_interceptor.h"
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

// Checks a one-token-per-sequence answer of `request` for sequence `seq` (the request's only
// sequence) against its oracle, which advances; returns the relative error.
double CheckDecodeAnswer(mock::CheckedSequence* seq, int32_t layer,
                         const v1::DecodeStepRequest& request, const v1::LayerOutput& output) {
  mock::Activations acts;
  acts.tokens = 1;
  std::vector<float> got;
  EXPECT_TRUE(client::TensorToFloats(request.qkv(), &acts.qkv).ok());
  EXPECT_TRUE(client::TensorToFloats(request.a(), &acts.a).ok());
  EXPECT_TRUE(client::TensorToFloats(request.b(), &acts.b).ok());
  EXPECT_TRUE(client::TensorToFloats(output.output(), &got).ok());
  return seq->CheckCommitted(layer, acts, got.data());
}

class ReplayTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    server_ = InProcessServer::Start();
    ASSERT_NE(server_, nullptr);
    driver_ = std::make_unique<WireDriver>(server_->address(), GetParam(), 3);
    ASSERT_OK(driver_->Init());
  }
  std::unique_ptr<InProcessServer> server_;
  std::unique_ptr<WireDriver> driver_;
};

TEST_P(ReplayTest, ACallSentTwiceIsAppliedOnceAndAnsweredTwice) {
  WireDriver& d = *driver_;
  auto* a = d.NewSequence(21);
  auto* b = d.NewSequence(22);
  ASSERT_OK(d.Open({a, b}));
  ASSERT_OK(d.Prefill({a, b}, {30, 3}));
  const int64_t pos = a->position(0);
  v1::StreamRequest call = d.DecodeCall(0, {a, b});
  v1::StreamResponse first = d.Run(call);
  ASSERT_EQ(first.status_code(), 0) << first.status_message();
  EXPECT_FALSE(first.layer_output().replayed());
  v1::StreamResponse again = d.Run(call);
  ASSERT_EQ(again.status_code(), 0) << again.status_message();
  EXPECT_TRUE(again.layer_output().replayed());
  EXPECT_EQ(again.layer_output().output().data(), first.layer_output().output().data());
  EXPECT_EQ(again.layer_output().positions(0), pos + 1);
  EXPECT_EQ(again.layer_output().positions(1), b->position(0) + 1);
  // Applied once: after another call, the same call is no longer a retry but a stale position.
  v1::StreamResponse next = d.Run(d.DecodeCall(1, {a, b}));
  ASSERT_EQ(next.status_code(), 0) << next.status_message();
  v1::StreamResponse refused = d.Run(call);
  EXPECT_EQ(refused.status_code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(refused.status_message(),
              HasSubstr("position is " + std::to_string(pos) + " but sequence 21 is at position " +
                        std::to_string(pos + 1) + " on layer 0"));
}

TEST_P(ReplayTest, ReplayedStepsKeepEverySequenceOnTheOracle) {
  WireDriver& d = *driver_;
  auto* a = d.NewSequence(31);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {12}));
  // A whole decode step, every layer's call sent twice; the oracle advances once.
  for (int32_t layer = 0; layer < d.config().num_layers; ++layer) {
    v1::StreamRequest call = d.DecodeCall(layer, {a});
    v1::StreamResponse r1 = d.Run(call);
    v1::StreamResponse r2 = d.Run(call);
    ASSERT_EQ(r1.status_code(), 0) << r1.status_message();
    ASSERT_EQ(r2.status_code(), 0) << r2.status_message();
    EXPECT_FALSE(r1.layer_output().replayed());
    EXPECT_TRUE(r2.layer_output().replayed());
    EXPECT_EQ(r1.layer_output().output().data(), r2.layer_output().output().data());
    EXPECT_LE(CheckDecodeAnswer(a, layer, call.decode_step(), r1.layer_output()), 1e-5);
  }
  ASSERT_OK(d.Decode({a}));  // one token per layer was applied, not two
  auto* b = d.NewSequence(32);
  ASSERT_OK(d.Open({b}));
  ASSERT_OK(d.Prefill({b}, {20}));
  ASSERT_OK(d.Decode({b}));
  // CommitDrafts sent twice is applied once.
  ASSERT_OK(d.Verify({b}, {3}));
  v1::StreamRequest commit;
  v1::CommitItem* item = commit.mutable_commit_drafts()->add_items();
  item->set_id(b->id());
  item->set_position(b->position(0));
  item->set_accepted(2);
  ASSERT_EQ(d.Run(commit).status_code(), 0);
  ASSERT_EQ(d.Run(commit).status_code(), 0);  // the retry is answered OK, not applied again
  b->CommitDrafts(2);
  ASSERT_OK(d.Decode({b}));  // positions advanced by exactly 2: the oracle still agrees
  ASSERT_OK(d.Close({a, b}));
}

INSTANTIATE_TEST_SUITE_P(Transports, ReplayTest, ::testing::Values("unary", "stream"),
                         [](const auto& info) { return info.param; });

// Turns the first OK answer of `method` into UNAVAILABLE, as if the answer had been lost after
// the server applied the call.
class LoseFirstAnswer : public grpc::experimental::Interceptor {
 public:
  LoseFirstAnswer(std::atomic<int>* lost, bool applies) : lost_(lost), applies_(applies) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (applies_ && methods->QueryInterceptionHookPoint(
                        grpc::experimental::InterceptionHookPoints::POST_RECV_STATUS)) {
      grpc::Status* status = methods->GetRecvStatus();
      if (status->ok() && lost_->fetch_add(1) == 0) {
        *status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "injected: answer lost");
      }
    }
    methods->Proceed();
  }

 private:
  std::atomic<int>* lost_;
  bool applies_;
};

class LoseFirstAnswerFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  LoseFirstAnswerFactory(std::string method, std::atomic<int>* lost)
      : method_(std::move(method)), lost_(lost) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new LoseFirstAnswer(lost_, absl::EndsWith(info->method(), method_));
  }

 private:
  std::string method_;
  std::atomic<int>* lost_;
};

std::unique_ptr<client::Client> ClientLosingFirstAnswer(const std::string& address,
                                                        const std::string& method,
                                                        std::atomic<int>* lost) {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<LoseFirstAnswerFactory>(method, lost));
  client::ClientOptions options;
  auto channel = grpc::experimental::CreateCustomChannelWithInterceptors(
      address, grpc::InsecureChannelCredentials(), client::Client::ChannelArgumentsFor(options),
      std::move(factories));
  return std::make_unique<client::Client>(channel, options);
}

TEST(ClientRetryTest, ALostDecodeAnswerIsRetriedAndReplayedExactlyOnce) {
  auto server = InProcessServer::Start();
  ASSERT_NE(server, nullptr);
  WireDriver d(server->address(), "unary", 8);
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(41);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {17}));
  std::atomic<int> lost{0};
  auto lossy = ClientLosingFirstAnswer(server->address(), "/DecodeStep", &lost);

  // Every layer of one decode step through the lossy client; only the first answer is lost.
  for (int32_t layer = 0; layer < d.config().num_layers; ++layer) {
    v1::StreamRequest call = d.DecodeCall(layer, {a});
    v1::LayerOutput out;
    int attempts = 0;
    client::CallOptions opts;
    opts.attempts = &attempts;
    ASSERT_OK(lossy->DecodeStep(call.decode_step(), &out, opts));
    EXPECT_EQ(attempts, layer == 0 ? 2 : 1);
    EXPECT_EQ(out.replayed(), layer == 0);
    EXPECT_EQ(out.positions(0), a->position(layer) + 1);
    // The answer (replayed or not) matches the oracle.
    EXPECT_LE(CheckDecodeAnswer(a, layer, call.decode_step(), out), 1e-5);
  }
  EXPECT_EQ(lost.load(), d.config().num_layers + 1);  // OK answers seen, the lost one included
  ASSERT_OK(d.Decode({a}));  // applied once per layer: positions and oracle still agree
  ASSERT_OK(d.Close({a}));
}

TEST(ClientRetryTest, OpenRetriedAfterALostAnswerSucceeds) {
  auto server = InProcessServer::Start();
  ASSERT_NE(server, nullptr);
  std::atomic<int> lost{0};
  auto lossy = ClientLosingFirstAnswer(server->address(), "/OpenSequences", &lost);
  int attempts = 0;
  client::CallOptions opts;
  opts.attempts = &attempts;
  const uint64_t ids[] = {51, 52};
  ASSERT_OK(lossy->OpenSequences(ids, opts));
  EXPECT_EQ(attempts, 2);  // the retry saw ALREADY_EXISTS: the first attempt had opened them
  // A first attempt that fails with ALREADY_EXISTS is a real error.
  absl::Status again = lossy->OpenSequences(ids);
  EXPECT_EQ(again.code(), absl::StatusCode::kAlreadyExists) << again;
  ASSERT_OK(lossy->CloseSequences(ids));
}

}  // namespace
}  // namespace kvbuffer::testing
