// Every engine error observed over the wire, unary and on a Stream: the right status code, a
// message naming the field and values, and afterwards the sequences go on matching the oracle.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/client_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

class WireErrorsTest : public ::testing::TestWithParam<std::string> {
 protected:
  void StartServer(EngineOptions options) {
    server_ = InProcessServer::Start(std::move(options));
    ASSERT_NE(server_, nullptr);
    driver_ = std::make_unique<WireDriver>(server_->address(), GetParam(), 11);
    ASSERT_OK(driver_->Init());
  }

  // Sends `call` and expects `code` with every one of `parts` in the message.
  void ExpectError(v1::StreamRequest call, absl::StatusCode code,
                   const std::vector<std::string>& parts) {
    const absl::Status s = client::FromStreamResponse(driver_->Run(std::move(call)));
    EXPECT_EQ(s.code(), code) << s;
    for (const std::string& p : parts) EXPECT_THAT(std::string(s.message()), HasSubstr(p)) << s;
  }

  std::unique_ptr<InProcessServer> server_;
  std::unique_ptr<WireDriver> driver_;
};

TEST_P(WireErrorsTest, EveryCallErrorHasItsCodeAndTheSequencesContinue) {
  StartServer(SmallModelOptions());
  WireDriver& d = *driver_;
  const int32_t C = d.config().channels();
  const int32_t L = d.config().num_layers;
  auto* a = d.NewSequence(101);
  auto* b = d.NewSequence(102);
  const Seqs ab = {a, b};
  ASSERT_OK(d.Open(ab));
  ASSERT_OK(d.Prefill(ab, {5, 70}));  // one under the stateless limit (64), one over it

  struct Case {
    std::string name;
    std::function<void(v1::DecodeStepRequest*)> corrupt;
    absl::StatusCode code;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"unknown sequence",
       [](auto* r) { r->mutable_sequences(1)->set_id(999999); },
       absl::StatusCode::kNotFound,
       {"sequence 999999", "not open"}},
      {"wrong qkv shape",
       [C](auto* r) {
         r->mutable_qkv()->set_shape(1, C + 1);
         r->mutable_qkv()->mutable_data()->resize(2 * (C + 1) * 2);
       },
       absl::StatusCode::kInvalidArgument,
       {"qkv.shape must be [2, " + std::to_string(C) + "]", "got [2, " + std::to_string(C + 1)}},
      {"data size does not match the shape",
       [](auto* r) { r->mutable_qkv()->mutable_data()->resize(r->qkv().data().size() - 2); },
       absl::StatusCode::kInvalidArgument,
       {absl::StrCat("qkv.data has ", 2 * C * 2 - 2, " bytes, expected ", 2 * C * 2,
                     " for shape [2, ", C, "] BF16")}},
      {"dtype unspecified",
       [](auto* r) { r->mutable_a()->set_dtype(v1::DTYPE_UNSPECIFIED); },
       absl::StatusCode::kInvalidArgument,
       {"a.dtype is DTYPE_UNSPECIFIED"}},
      {"dtypes differ",
       [](auto* r) {
         r->mutable_b()->set_dtype(v1::FP32);
         r->mutable_b()->mutable_data()->resize(r->b().data().size() * 2);
       },
       absl::StatusCode::kInvalidArgument,
       {"b.dtype is FP32 but qkv.dtype is BF16"}},
      {"missing tensor",
       [](auto* r) { r->clear_b(); },
       absl::StatusCode::kInvalidArgument,
       {"b is missing"}},
      {"layer out of range",
       [L](auto* r) { r->set_layer(L); },
       absl::StatusCode::kInvalidArgument,
       {absl::StrCat("layer must be in [0, ", L, "), got ", L)}},
      {"negative layer",
       [](auto* r) { r->set_layer(-1); },
       absl::StatusCode::kInvalidArgument,
       {"got -1"}},
      {"two tokens in a decode step",
       [](auto* r) { r->mutable_sequences(0)->set_num_tokens(2); },
       absl::StatusCode::kInvalidArgument,
       {"num_tokens must be 1"}},
      {"a sequence twice",
       [](auto* r) { r->mutable_sequences(1)->set_id(101); },
       absl::StatusCode::kInvalidArgument,
       {"repeats sequence 101"}},
      {"non-finite activation",
       [](auto* r) {
         (*r->mutable_qkv()->mutable_data())[1] = static_cast<char>(0x7f);
         (*r->mutable_qkv()->mutable_data())[0] = static_cast<char>(0xc0);
       },
       absl::StatusCode::kInvalidArgument,
       {"qkv holds a non-finite value"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::StreamRequest call = d.DecodeCall(0, ab);
    c.corrupt(call.mutable_decode_step());
    ExpectError(std::move(call), c.code, c.parts);
    // Nothing was applied: the sequences go on from where they were.
    ASSERT_OK(d.Decode(ab));
  }

  // A position mismatch names both positions.
  for (int64_t delta : {3, -1}) {
    const int64_t pos = a->position(0);
    v1::StreamRequest call = d.DecodeCall(0, ab);
    call.mutable_decode_step()->mutable_sequences(0)->set_position(pos + delta);
    ExpectError(std::move(call), absl::StatusCode::kFailedPrecondition,
                {absl::StrCat("sequences[0].position is ", pos + delta,
                              " but sequence 101 is at "
                              "position ",
                              pos, " on layer 0")});
    ASSERT_OK(d.Decode(ab));
  }

  // Drafts: over-commit is OUT_OF_RANGE, and a decode with drafts pending is refused.
  ASSERT_OK(d.Verify(ab, {2, 3}));
  {
    v1::StreamRequest call;
    v1::CommitItem* item = call.mutable_commit_drafts()->add_items();
    item->set_id(a->id());
    item->set_position(a->position(0));
    item->set_accepted(3);
    ExpectError(std::move(call), absl::StatusCode::kOutOfRange,
                {"accepted is 3", "only 2 drafts pending"});
  }
  ExpectError(d.DecodeCall(0, ab), absl::StatusCode::kFailedPrecondition,
              {"uncommitted drafts", "CommitDrafts"});
  ASSERT_OK(d.Commit(ab, {1, 3}));
  ASSERT_OK(d.Decode(ab));

  // Lifecycle errors.
  {
    v1::StreamRequest call;
    call.mutable_open_sequences()->add_ids(a->id());
    ExpectError(std::move(call), absl::StatusCode::kAlreadyExists,
                {"sequence 101 is already open"});
  }
  {
    v1::StreamRequest call;
    call.mutable_close_sequences()->add_ids(424242);
    ExpectError(std::move(call), absl::StatusCode::kNotFound, {"sequence 424242 is not open"});
  }
  ExpectError(v1::StreamRequest(), absl::StatusCode::kInvalidArgument, {});
  ASSERT_OK(d.Flush(ab));
  ASSERT_OK(d.Decode(ab));
  ASSERT_OK(d.Close(ab));
  EXPECT_LE(d.max_error(), 1e-5);
}

TEST_P(WireErrorsTest, FullPoolsAreResourceExhaustedAndFreeAgainAfterClose) {
  EngineOptions o = SmallModelOptions();
  o.max_sequences = 3;
  o.state_slots = 1;
  o.stateless_limit = 8;
  StartServer(o);
  WireDriver& d = *driver_;
  auto* a = d.NewSequence(1);
  auto* b = d.NewSequence(2);
  auto* c = d.NewSequence(3);
  auto* e = d.NewSequence(4);
  {
    v1::StreamRequest call;
    for (uint64_t id : {1, 2, 3, 4}) call.mutable_open_sequences()->add_ids(id);
    ExpectError(std::move(call), absl::StatusCode::kResourceExhausted,
                {"sequence table is full", "max_sequences=3"});
  }
  ASSERT_OK(d.Open({a, b, c}));     // the failed open opened none of them
  ASSERT_OK(d.Prefill({a}, {20}));  // over the stateless limit: takes the only state slot
  ASSERT_OK(d.Prefill({b}, {3}));   // stateless: needs no slot
  // c needs a state slot too; none is free.
  absl::Status full = d.Prefill({c}, {12});
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_THAT(std::string(full.message()),
              AllOf(HasSubstr("state pool is full"), HasSubstr("state_slots=1")));
  ASSERT_OK(d.Decode({a, b}));  // the others are untouched
  ASSERT_OK(d.Close({a}));
  ASSERT_OK(d.Prefill({c}, {12}));  // the slot a held is free again
  ASSERT_OK(d.Decode({b, c}));
  ASSERT_OK(d.Open({e}));
  ASSERT_OK(d.Close({b, c, e}));
}

TEST_P(WireErrorsTest, DrainingRefusesNewSequencesAndServesOpenOnes) {
  StartServer(SmallModelOptions());
  WireDriver& d = *driver_;
  auto* a = d.NewSequence(7);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {9}));
  server_->server()->BeginDrain();
  v1::StreamRequest call;
  call.mutable_open_sequences()->add_ids(8);
  ExpectError(std::move(call), absl::StatusCode::kUnavailable, {"draining", "OpenSequences"});
  absl::StatusOr<client::ServingStatus> ready = d.client()->CheckHealth("readiness");
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_EQ(*ready, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  absl::StatusOr<client::ServingStatus> live = d.client()->CheckHealth("liveness");
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_EQ(*live, grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_OK(d.Decode({a}));
  ASSERT_OK(d.Verify({a}, {2}));
  ASSERT_OK(d.Commit({a}, {2}));
  ASSERT_OK(d.Close({a}));
}

INSTANTIATE_TEST_SUITE_P(Transports, WireErrorsTest, ::testing::Values("unary", "stream"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvbuffer::testing
