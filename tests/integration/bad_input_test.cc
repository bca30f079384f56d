// Every field of every request, malformed over the wire (unary and on a Stream): each is refused
// with a precise status naming the field and what was expected, and changes nothing: afterwards
// the sequences go on and still match their fp64 oracles. NaN and Inf activations of every dtype,
// and finite ones of magnitude 2^20 or more, are refused before they can reach a state.
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/client_status.h"
#include "client/cpp/tensor_builder.h"
#include "gmock/gmock.h"
#include "google/protobuf/unknown_field_set.h"
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

struct Case {
  std::string name;
  std::function<void(v1::StreamRequest*)> build;  // from a valid DecodeStep call of {a, b}
  absl::StatusCode code;
  std::vector<std::string> parts;  // substrings of the message
};

// Moves the valid DecodeStep of `call` into a Prefill or VerifyDrafts of one token each.
void AsPrefill(v1::StreamRequest* call) {
  v1::DecodeStepRequest d = call->decode_step();
  v1::PrefillRequest* p = call->mutable_prefill();
  p->set_layer(d.layer());
  *p->mutable_sequences() = d.sequences();
  *p->mutable_qkv() = d.qkv();
  *p->mutable_a() = d.a();
  *p->mutable_b() = d.b();
  p->set_output_dtype(d.output_dtype());
}

void AsVerify(v1::StreamRequest* call) {
  v1::DecodeStepRequest d = call->decode_step();
  v1::VerifyDraftsRequest* v = call->mutable_verify_drafts();
  v->set_layer(d.layer());
  *v->mutable_sequences() = d.sequences();
  *v->mutable_qkv() = d.qkv();
  *v->mutable_a() = d.a();
  *v->mutable_b() = d.b();
  v->set_output_dtype(d.output_dtype());
}

// Re-encodes the activations of a DecodeStep in `dtype`, with `value` at qkv element `at` (or at
// a/b element `at` when `field` says so).
void WithValue(v1::DecodeStepRequest* r, DType dtype, const std::string& field, int at,
               float value) {
  for (auto [name, t] : {std::pair<std::string, v1::Tensor*>{"qkv", r->mutable_qkv()},
                         {"a", r->mutable_a()},
                         {"b", r->mutable_b()}}) {
    std::vector<float> v;
    ASSERT_TRUE(client::TensorToFloats(*t, &v).ok());
    if (name == field) v[at] = value;
    const std::vector<int64_t> shape(t->shape().begin(), t->shape().end());
    client::SetTensor(v, shape, dtype, t);
  }
}

class BadInputTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    server_ = InProcessServer::Start(options_);
    ASSERT_NE(server_, nullptr);
    driver_ = std::make_unique<WireDriver>(server_->address(), GetParam(), 17);
    ASSERT_OK(driver_->Init());
    a_ = driver_->NewSequence(101);
    b_ = driver_->NewSequence(102);
    ASSERT_OK(driver_->Open({a_, b_}));
    ASSERT_OK(driver_->Prefill({a_, b_}, {5, 70}));
  }

  // Sends each case and checks its status; after each, a valid step still matches the oracle.
  void RunCases(const std::vector<Case>& cases) {
    for (const Case& c : cases) {
      SCOPED_TRACE(c.name);
      v1::StreamRequest call = driver_->DecodeCall(0, {a_, b_});
      c.build(&call);
      const absl::Status s = client::FromStreamResponse(driver_->Run(std::move(call)));
      EXPECT_EQ(s.code(), c.code) << s;
      for (const std::string& p : c.parts) EXPECT_THAT(std::string(s.message()), HasSubstr(p));
      EXPECT_LT(s.message().size(), 1000u) << "messages stay short";
      ASSERT_OK(driver_->Decode({a_, b_}));
    }
    EXPECT_EQ(server_->engine()->Info().open_sequences, 2);
  }

  EngineOptions options_ = SmallModelOptions();
  std::unique_ptr<InProcessServer> server_;
  std::unique_ptr<WireDriver> driver_;
  mock::CheckedSequence* a_ = nullptr;
  mock::CheckedSequence* b_ = nullptr;
};

TEST_P(BadInputTest, EveryFieldOfALayerCallIsValidated) {
  const int32_t C = driver_->config().channels();
  const int32_t HV = driver_->config().num_v_heads;
  const int32_t L = driver_->config().num_layers;
  const std::string shape = absl::StrCat("[2, ", C, "]");
  auto decode = [](auto f) { return [f](v1::StreamRequest* c) { f(c->mutable_decode_step()); }; };
  auto prefill = [](auto f) {
    return [f](v1::StreamRequest* c) {
      AsPrefill(c);
      f(c->mutable_prefill());
    };
  };
  auto verify = [](auto f) {
    return [f](v1::StreamRequest* c) {
      AsVerify(c);
      f(c->mutable_verify_drafts());
    };
  };
  const int64_t huge = int64_t{1} << 40;
  const std::vector<Case> cases = {
      // layer
      {"layer too large",
       decode([L](auto* r) { r->set_layer(L); }),
       absl::StatusCode::kInvalidArgument,
       {absl::StrCat("layer must be in [0, ", L, "), got ", L)}},
      {"negative layer",
       prefill([](auto* r) { r->set_layer(-7); }),
       absl::StatusCode::kInvalidArgument,
       {"Prefill: layer must be in [0, ", "got -7"}},
      // sequences
      {"no sequences",
       verify([](auto* r) { r->clear_sequences(); }),
       absl::StatusCode::kInvalidArgument,
       {"VerifyDrafts: sequences must not be empty"}},
      {"more sequences than the table holds",
       decode([](auto* r) {
         for (int i = 0; i < 64; ++i) *r->add_sequences() = r->sequences(0);
       }),
       absl::StatusCode::kInvalidArgument,
       {"sequences has 66 entries, expected at most 64"}},
      {"a sequence twice",
       decode([](auto* r) { r->mutable_sequences(1)->set_id(101); }),
       absl::StatusCode::kInvalidArgument,
       {"sequences[1].id repeats sequence 101 (sequences[0])"}},
      {"negative position",
       decode([](auto* r) { r->mutable_sequences(1)->set_position(-1); }),
       absl::StatusCode::kInvalidArgument,
       {"sequences[1].position must be >= 0", "got -1"}},
      {"decode of two tokens",
       decode([](auto* r) { r->mutable_sequences(0)->set_num_tokens(2); }),
       absl::StatusCode::kInvalidArgument,
       {"sequences[0].num_tokens must be 1 for DecodeStep", "got 2"}},
      {"decode of -1 tokens",
       decode([](auto* r) { r->mutable_sequences(0)->set_num_tokens(-1); }),
       absl::StatusCode::kInvalidArgument,
       {"num_tokens must be 1 for DecodeStep", "got -1"}},
      {"prefill of 0 tokens",
       prefill([](auto* r) { r->mutable_sequences(1)->set_num_tokens(0); }),
       absl::StatusCode::kInvalidArgument,
       {"sequences[1].num_tokens must be in [1, 16777216] for Prefill, got 0"}},
      {"prefill of too many tokens",
       prefill([](auto* r) { r->mutable_sequences(0)->set_num_tokens((1 << 24) + 1); }),
       absl::StatusCode::kInvalidArgument,
       {"must be in [1, 16777216] for Prefill, got 16777217"}},
      {"prefill whose tokens overflow a call",
       prefill([](auto* r) {
         for (int i = 0; i < 2; ++i) r->mutable_sequences(i)->set_num_tokens(1 << 24);
       }),
       absl::StatusCode::kInvalidArgument,
       {"Prefill: the sequences carry 33554432 tokens in all"}},
      {"verify of 0 drafts",
       verify([](auto* r) { r->mutable_sequences(0)->set_num_tokens(0); }),
       absl::StatusCode::kInvalidArgument,
       {"num_tokens must be in [1, max_drafts=16] for VerifyDrafts, got 0"}},
      {"verify of too many drafts",
       verify([](auto* r) { r->mutable_sequences(0)->set_num_tokens(17); }),
       absl::StatusCode::kInvalidArgument,
       {"max_drafts=16", "got 17"}},
      // tensors
      {"qkv missing",
       decode([](auto* r) { r->clear_qkv(); }),
       absl::StatusCode::kInvalidArgument,
       {"qkv is missing, expected a tensor of shape " + shape + " ([total_tokens, channels])"}},
      {"a missing",
       prefill([](auto* r) { r->clear_a(); }),
       absl::StatusCode::kInvalidArgument,
       {absl::StrCat("a is missing, expected a tensor of shape [2, ", HV,
                     "] ([total_tokens, HV])")}},
      {"b missing",
       verify([](auto* r) { r->clear_b(); }),
       absl::StatusCode::kInvalidArgument,
       {"b is missing"}},
      {"dtype unspecified",
       decode([](auto* r) { r->mutable_qkv()->set_dtype(v1::DTYPE_UNSPECIFIED); }),
       absl::StatusCode::kInvalidArgument,
       {"qkv.dtype is DTYPE_UNSPECIFIED, expected FP32, FP16 or BF16"}},
      {"unknown dtype",
       decode([](auto* r) { r->mutable_a()->set_dtype(static_cast<v1::DType>(7)); }),
       absl::StatusCode::kInvalidArgument,
       {"a.dtype has unknown value 7, expected FP32, FP16 or BF16"}},
      {"rank 3",
       decode([C](auto* r) {
         r->mutable_qkv()->clear_shape();
         for (int64_t d : {int64_t{2}, int64_t{1}, int64_t{C}}) r->mutable_qkv()->add_shape(d);
       }),
       absl::StatusCode::kInvalidArgument,
       {"qkv.shape must be " + shape + " ([total_tokens, channels]), got [2, 1, " +
        std::to_string(C) + "]"}},
      {"rank 1",
       decode([HV](auto* r) {
         r->mutable_b()->clear_shape();
         r->mutable_b()->add_shape(2 * HV);  // the same bytes, flattened
       }),
       absl::StatusCode::kInvalidArgument,
       {absl::StrCat("b.shape must be [2, ", HV, "] ([total_tokens, HV]), got [", 2 * HV, "]")}},
      {"rank 9 (over the limit)",
       decode([](auto* r) {
         r->mutable_qkv()->clear_shape();
         for (int i = 0; i < 9; ++i) r->mutable_qkv()->add_shape(1);
       }),
       absl::StatusCode::kInvalidArgument,
       {"qkv.shape has 9 dimensions, expected at most 8"}},
      {"a million dimensions",
       decode([](auto* r) {
         r->mutable_qkv()->clear_shape();
         for (int i = 0; i < 1000000; ++i) r->mutable_qkv()->add_shape(1);
       }),
       absl::StatusCode::kInvalidArgument,
       {"qkv.shape has 1000000 dimensions, expected at most 8"}},
      {"negative dimension",
       decode([](auto* r) { r->mutable_a()->set_shape(0, -2); }),
       absl::StatusCode::kInvalidArgument,
       {"a.shape[0] is -2, expected >= 0"}},
      {"shape product overflows",
       decode([huge](auto* r) {
         r->mutable_qkv()->set_shape(0, huge);
         r->mutable_qkv()->set_shape(1, huge);
       }),
       absl::StatusCode::kInvalidArgument,
       {"qkv.data has", "expected more than 2^63"}},
      {"rows disagree with the tokens",
       decode([C](auto* r) {
         r->mutable_qkv()->set_shape(0, 3);
         r->mutable_qkv()->mutable_data()->resize(3 * C * 2);
       }),
       absl::StatusCode::kInvalidArgument,
       {"qkv.shape must be " + shape, "got [3, " + std::to_string(C) + "]"}},
      {"data one byte short",
       decode([](auto* r) { r->mutable_b()->mutable_data()->pop_back(); }),
       absl::StatusCode::kInvalidArgument,
       {absl::StrCat("b.data has ", 2 * HV * 2 - 1, " bytes, expected ", 2 * HV * 2,
                     " for shape [2, ", HV, "] BF16")}},
      {"dtypes differ",
       decode([](auto* r) {
         std::vector<float> v;
         ASSERT_TRUE(client::TensorToFloats(r->a(), &v).ok());
         const std::vector<int64_t> s(r->a().shape().begin(), r->a().shape().end());
         client::SetTensor(v, s, DType::kFloat16, r->mutable_a());
       }),
       absl::StatusCode::kInvalidArgument,
       {"a.dtype is FP16 but qkv.dtype is BF16; qkv, a and b must share one dtype"}},
      {"unknown output_dtype",
       verify([](auto* r) { r->set_output_dtype(static_cast<v1::DType>(9)); }),
       absl::StatusCode::kInvalidArgument,
       {"output_dtype has unknown value 9"}},
      // Engine state checks come after the wire checks.
      {"unknown sequence",
       decode([](auto* r) { r->mutable_sequences(0)->set_id(777); }),
       absl::StatusCode::kNotFound,
       {"sequences[0].id: sequence 777 is not open"}},
      {"stale position",
       decode([](auto* r) { r->mutable_sequences(0)->set_position(0); }),
       absl::StatusCode::kFailedPrecondition,
       {"sequences[0].position is 0 but sequence 101 is at position"}},
  };
  RunCases(cases);
}

TEST_P(BadInputTest, NonFiniteActivationsOfEveryDtypeAreRefusedBeforeTheyReachAState) {
  std::vector<Case> cases;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (auto [field, at, value, shown] :
         {std::tuple<std::string, int, float, std::string>{"qkv", 5, nan, "nan"},
          {"a", 3, inf, "inf"},
          {"b", 1, -inf, "-inf"}}) {
      cases.push_back(
          {absl::StrCat(DTypeName(dtype), " ", field, " ", shown),
           [=](v1::StreamRequest* c) {
             WithValue(c->mutable_decode_step(), dtype, field, at, value);
           },
           absl::StatusCode::kInvalidArgument,
           {absl::StrCat(field, " holds a non-finite value (", shown, ") at element ", at)}});
    }
  }
  // Prefill and verify take the same path.
  cases.push_back({"prefill",
                   [&](v1::StreamRequest* c) {
                     WithValue(c->mutable_decode_step(), DType::kFloat32, "qkv", 0, inf);
                     AsPrefill(c);
                   },
                   absl::StatusCode::kInvalidArgument,
                   {"qkv holds a non-finite value (inf)"}});
  cases.push_back({"verify",
                   [&](v1::StreamRequest* c) {
                     WithValue(c->mutable_decode_step(), DType::kBFloat16, "b", 2, nan);
                     AsVerify(c);
                   },
                   absl::StatusCode::kInvalidArgument,
                   {"b holds a non-finite value (nan)"}});
  RunCases(cases);
  // The largest finite FP16 value is accepted (every FP16 value is below the magnitude bound).
  v1::StreamRequest call = driver_->DecodeCall(0, {a_, b_});
  WithValue(call.mutable_decode_step(), DType::kFloat16, "a", 0, 65504.0f);
  EXPECT_EQ(driver_->Run(std::move(call)).status_code(), 0);
}

TEST_P(BadInputTest, ActivationsOfMagnitudeTwoToTheTwentyOrMoreAreRefused) {
  const std::string bound = "activations must have |x| < 2^20 (1048576)";
  const std::vector<Case> cases = {
      {"FP32 qkv 1e38",
       [](auto* c) { WithValue(c->mutable_decode_step(), DType::kFloat32, "qkv", 7, 1e38f); },
       absl::StatusCode::kInvalidArgument,
       {"qkv holds 1e+38 at element 7; ", bound}},
      {"FP32 a exactly -2^20",
       [](auto* c) { WithValue(c->mutable_decode_step(), DType::kFloat32, "a", 3, -1048576.0f); },
       absl::StatusCode::kInvalidArgument,
       {"a holds -1.04858e+06 at element 3; ", bound}},
      {"BF16 b 2^21",
       [](auto* c) { WithValue(c->mutable_decode_step(), DType::kBFloat16, "b", 1, 2097152.0f); },
       absl::StatusCode::kInvalidArgument,
       {"b holds 2.09715e+06 at element 1; ", bound}},
      {"prefill FP32 qkv -3e30",
       [](auto* c) {
         WithValue(c->mutable_decode_step(), DType::kFloat32, "qkv", 0, -3e30f);
         AsPrefill(c);
       },
       absl::StatusCode::kInvalidArgument,
       {"qkv holds -3e+30 at element 0; ", bound}},
      {"verify BF16 a 1e20",
       [](auto* c) {
         WithValue(c->mutable_decode_step(), DType::kBFloat16, "a", 2, 1e20f);
         AsVerify(c);
       },
       absl::StatusCode::kInvalidArgument,
       {"a holds ", "at element 2; ", bound}},
  };
  RunCases(cases);
}

// Every activation just below the bound, in FP32 and BF16, through a chunked prefill past the
// stateless limit, decodes across flush boundaries, drafts and a commit, and an explicit flush: the
// server answers every call, every output is finite, and the sequence goes on.
TEST_P(BadInputTest, ActivationsJustBelowTheMagnitudeBoundAreServedAndEveryOutputIsFinite) {
  const ModelConfig& m = driver_->config();
  const int64_t C = m.channels(), HV = m.num_v_heads;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const uint64_t id = dtype == DType::kFloat32 ? 201 : 202;
    // The largest values below 2^20 of each dtype, with pseudo-random signs (a = -max: no decay).
    const float big = dtype == DType::kFloat32 ? 1048575.9375f : 1044480.0f;
    uint64_t rng = 0x9e3779b97f4a7c15ull ^ id;
    auto next_sign = [&rng] {
      rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
      return (rng >> 11) & 1 ? 1.0f : -1.0f;
    };
    v1::StreamRequest open;
    open.mutable_open_sequences()->add_ids(id);
    ASSERT_EQ(driver_->Run(open).status_code(), 0);
    int64_t position = 0;
    // One call of kind `kind` ("prefill", "decode", "verify") with `tokens` tokens on every layer.
    auto step = [&](const std::string& kind, int32_t tokens) {
      for (int32_t layer = 0; layer < m.num_layers; ++layer) {
        std::vector<float> qkv(tokens * C), a(tokens * HV), b(tokens * HV);
        for (float& x : qkv) x = big * next_sign();
        for (float& x : a) x = -big;
        for (float& x : b) x = big * next_sign();
        v1::StreamRequest call;
        auto fill = [&](auto* r) {
          r->set_layer(layer);
          v1::SequenceTokens* s = r->add_sequences();
          s->set_id(id);
          s->set_position(position);
          s->set_num_tokens(tokens);
          client::SetTensor(qkv, {tokens, C}, dtype, r->mutable_qkv());
          client::SetTensor(a, {tokens, HV}, dtype, r->mutable_a());
          client::SetTensor(b, {tokens, HV}, dtype, r->mutable_b());
        };
        if (kind == "prefill") fill(call.mutable_prefill());
        if (kind == "decode") fill(call.mutable_decode_step());
        if (kind == "verify") fill(call.mutable_verify_drafts());
        v1::StreamResponse r = driver_->Run(std::move(call));
        ASSERT_EQ(r.status_code(), 0) << kind << " layer " << layer << ": " << r.status_message();
        std::vector<float> out;
        ASSERT_OK(client::TensorToFloats(r.layer_output().output(), &out));
        ASSERT_EQ(out.size(), static_cast<size_t>(tokens * HV * m.head_v_dim));
        for (size_t i = 0; i < out.size(); ++i) {
          ASSERT_TRUE(std::isfinite(out[i])) << kind << " layer " << layer << " output " << i;
        }
      }
    };
    ASSERT_NO_FATAL_FAILURE(step("prefill", 100));
    position += 100;
    for (int i = 0; i < 20; ++i) {
      ASSERT_NO_FATAL_FAILURE(step("decode", 1));
      position += 1;
    }
    ASSERT_NO_FATAL_FAILURE(step("verify", 4));
    v1::StreamRequest commit;
    v1::CommitItem* item = commit.mutable_commit_drafts()->add_items();
    item->set_id(id);
    item->set_position(position);
    item->set_accepted(2);
    ASSERT_EQ(driver_->Run(commit).status_code(), 0);
    position += 2;
    v1::StreamRequest flush;
    flush.mutable_flush()->add_ids(id);
    ASSERT_EQ(driver_->Run(flush).status_code(), 0);
    ASSERT_NO_FATAL_FAILURE(step("decode", 1));
    absl::StatusOr<SequenceInfo> info = server_->engine()->Describe("", id);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->positions[0], position + 1);
  }
  // The other sequences were not disturbed.
  ASSERT_OK(driver_->Decode({a_, b_}));
}

TEST_P(BadInputTest, EveryFieldOfTheOtherCallsIsValidated) {
  auto ids = [](auto* list, std::initializer_list<uint64_t> v) {
    for (uint64_t id : v) list->add_ids(id);
  };
  const std::vector<Case> cases = {
      {"open: no ids",
       [](auto* c) { c->mutable_open_sequences(); },
       absl::StatusCode::kInvalidArgument,
       {"OpenSequences: ids must not be empty"}},
      {"open: an id twice",
       [&](auto* c) {
         ids(c->mutable_open_sequences(), {5, 6, 5});
       },
       absl::StatusCode::kInvalidArgument,
       {"ids[2] repeats id 5 (ids[0])"}},
      {"open: more than the table holds",
       [](auto* c) {
         for (uint64_t i = 0; i < 65; ++i) c->mutable_open_sequences()->add_ids(1000 + i);
       },
       absl::StatusCode::kResourceExhausted,
       {"sequence table is full: 65 sequences asked, more than max_sequences=64"}},
      {"open: already open",
       [&](auto* c) {
         ids(c->mutable_open_sequences(), {9, 101});
       },
       absl::StatusCode::kAlreadyExists,
       {"sequence 101 is already open"}},
      {"close: no ids",
       [](auto* c) { c->mutable_close_sequences(); },
       absl::StatusCode::kInvalidArgument,
       {"CloseSequences: ids must not be empty"}},
      {"close: an id twice",
       [&](auto* c) {
         ids(c->mutable_close_sequences(), {101, 101});
       },
       absl::StatusCode::kInvalidArgument,
       {"ids[1] repeats id 101"}},
      {"close: too many ids",
       [](auto* c) {
         for (uint64_t i = 0; i < 100; ++i) c->mutable_close_sequences()->add_ids(i);
       },
       absl::StatusCode::kInvalidArgument,
       {"CloseSequences: ids has 100 entries, expected at most 64"}},
      {"close: one unknown",
       [&](auto* c) {
         ids(c->mutable_close_sequences(), {101, 55});
       },
       absl::StatusCode::kNotFound,
       {"sequence 55 is not open"}},
      {"flush: no ids",
       [](auto* c) { c->mutable_flush(); },
       absl::StatusCode::kInvalidArgument,
       {"Flush: ids must not be empty"}},
      {"flush: an id twice",
       [&](auto* c) {
         ids(c->mutable_flush(), {102, 101, 102});
       },
       absl::StatusCode::kInvalidArgument,
       {"ids[2] repeats id 102"}},
      {"commit: no items",
       [](auto* c) { c->mutable_commit_drafts(); },
       absl::StatusCode::kInvalidArgument,
       {"CommitDrafts: items must not be empty"}},
      {"commit: negative position",
       [](auto* c) {
         auto* i = c->mutable_commit_drafts()->add_items();
         i->set_id(101);
         i->set_position(-4);
       },
       absl::StatusCode::kInvalidArgument,
       {"items[0].position must be >= 0", "got -4"}},
      {"commit: negative accepted",
       [](auto* c) {
         auto* i = c->mutable_commit_drafts()->add_items();
         i->set_id(101);
         i->set_accepted(-1);
       },
       absl::StatusCode::kInvalidArgument,
       {"items[0].accepted must be >= 0", "got -1"}},
      {"commit: a sequence twice",
       [](auto* c) {
         c->mutable_commit_drafts()->add_items()->set_id(101);
         c->mutable_commit_drafts()->add_items()->set_id(101);
       },
       absl::StatusCode::kInvalidArgument,
       {"items[1].id repeats sequence 101 (items[0])"}},
      {"commit: nothing pending",
       [](auto* c) { c->mutable_commit_drafts()->add_items()->set_id(101); },
       absl::StatusCode::kFailedPrecondition,
       {"has no drafts pending"}},
      {"info: too many queries",
       [](auto* c) {
         for (int i = 0; i < 65; ++i) c->mutable_get_server_info()->add_capacity_queries();
       },
       absl::StatusCode::kInvalidArgument,
       {"capacity_queries has 65 entries, expected at most 64"}},
      {"info: negative length",
       [](auto* c) { c->mutable_get_server_info()->add_capacity_queries()->set_length(-1); },
       absl::StatusCode::kInvalidArgument,
       {"capacity_queries[0].length must be in [0, 1099511627776], got -1"}},
      {"info: huge length",
       [](auto* c) {
         c->mutable_get_server_info()->add_capacity_queries();
         c->mutable_get_server_info()->add_capacity_queries()->set_length(
             std::numeric_limits<int64_t>::max());
       },
       absl::StatusCode::kInvalidArgument,
       {"capacity_queries[1].length"}},
      {"info: too many drafts",
       [](auto* c) { c->mutable_get_server_info()->add_capacity_queries()->set_drafts(17); },
       absl::StatusCode::kInvalidArgument,
       {"capacity_queries[0].drafts must be in [0, max_drafts=16], got 17"}},
  };
  RunCases(cases);
  // A commit over what is pending is OUT_OF_RANGE and leaves the drafts pending.
  ASSERT_OK(driver_->Verify({a_}, {2}));
  v1::StreamRequest over;
  auto* item = over.mutable_commit_drafts()->add_items();
  item->set_id(101);
  item->set_position(a_->position(0));
  item->set_accepted(3);
  absl::Status s = client::FromStreamResponse(driver_->Run(std::move(over)));
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
  ASSERT_OK(driver_->Commit({a_}, {2}));
  ASSERT_OK(driver_->Decode({a_, b_}));
}

TEST(StreamEnvelopeTest, AnEmptyOrUnknownCallIsInvalidAndTheStreamGoesOn) {
  auto server = InProcessServer::Start();
  ASSERT_NE(server, nullptr);
  auto client = client::Client::Connect(server->address());
  auto stream = client->OpenStream(absl::Seconds(30));
  v1::StreamRequest empty;
  v1::StreamResponse r;
  ASSERT_TRUE(stream->Send(&empty).ok());
  ASSERT_TRUE(stream->Receive(&r).ok());
  EXPECT_EQ(r.status_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r.status_message(), HasSubstr("StreamRequest.call is not set"));
  // A call this server does not know (a field number from a newer client) reads as no call.
  v1::StreamRequest future;
  future.GetReflection()->MutableUnknownFields(&future)->AddLengthDelimited(42, "\x08\x01");
  ASSERT_TRUE(stream->Send(&future).ok());
  ASSERT_TRUE(stream->Receive(&r).ok());
  EXPECT_EQ(r.request_id(), future.request_id());
  EXPECT_EQ(r.status_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r.status_message(), HasSubstr("holds a call this server does not know"));
  absl::StatusOr<v1::GetServerInfoResponse> info = stream->GetServerInfo({});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(stream->Close().ok());
}

INSTANTIATE_TEST_SUITE_P(Transports, BadInputTest, ::testing::Values("unary", "stream"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvbuffer::testing
