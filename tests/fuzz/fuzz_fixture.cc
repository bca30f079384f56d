#include "tests/fuzz/fuzz_fixture.h"

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/cpp/tensor_builder.h"
#include "kernels/reference/layer_params.h"
#include "service/engine/cpu_backend.h"

namespace kvbuffer::fuzz {

namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Deterministic activations in [-1, 1).
std::vector<float> Values(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& f : v) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    f = static_cast<float>(x >> 40) / static_cast<float>(1 << 23) - 1.0f;
  }
  return v;
}

// One engine call on `tenant` of `kind` for (id, position, tokens) items, FP32 activations.
void EngineStep(Engine& e, const std::string& tenant, StepKind kind, int32_t layer,
                const std::vector<std::tuple<uint64_t, int64_t, int32_t>>& items) {
  const ModelConfig& m = e.options().model;
  LayerCall call;
  call.tenant = tenant;
  call.layer = layer;
  int64_t total = 0;
  for (auto [id, pos, n] : items) {
    call.sequences.push_back({id, pos, n});
    total += n;
  }
  const std::vector<float> qkv = Values(static_cast<size_t>(total) * m.channels(), layer + 11);
  const std::vector<float> ab = Values(static_cast<size_t>(total) * m.num_v_heads, layer + 17);
  call.qkv = {DType::kFloat32, {total, m.channels()}, qkv.data(), qkv.size() * 4};
  call.a = {DType::kFloat32, {total, m.num_v_heads}, ab.data(), ab.size() * 4};
  call.b = {DType::kFloat32, {total, m.num_v_heads}, ab.data(), ab.size() * 4};
  absl::StatusOr<LayerResult> r = kind == StepKind::kPrefill  ? e.Prefill(call)
                                  : kind == StepKind::kVerify ? e.VerifyDrafts(call)
                                                              : e.DecodeStep(call);
  if (!r.ok()) Fail(absl::StrCat("fixture setup: ", r.status().ToString()));
}

struct SequenceState {
  std::vector<int64_t> positions;
  int32_t pending = 0;
  bool has_state = false;
  int32_t pages = 0;
  bool operator==(const SequenceState&) const = default;
};

struct Snapshot {
  std::vector<std::pair<SequenceKey, SequenceState>> sequences;
  int32_t open = 0, free_conv = 0, free_state = 0, free_pages = 0;
  int64_t flushes = 0, verified = 0, accepted = 0;
};

Snapshot Take(Engine& e) {
  Snapshot s;
  for (const SequenceKey& k : e.ListSequences()) {
    absl::StatusOr<SequenceInfo> info = e.Describe(k.tenant, k.id);
    if (!info.ok()) Fail("Describe of a listed sequence failed");
    s.sequences.push_back(
        {k, {info->positions, info->pending_drafts, info->has_state, info->buffer_pages}});
  }
  const EngineInfo info = e.Info();
  s.open = info.open_sequences;
  s.free_conv = info.free_conv_slots;
  s.free_state = info.free_state_slots;
  s.free_pages = info.free_buffer_pages;
  s.flushes = info.flushes;
  s.verified = info.drafts_verified;
  s.accepted = info.drafts_accepted;
  return s;
}

bool SameState(const Snapshot& a, const Snapshot& b) {
  if (a.sequences.size() != b.sequences.size()) return false;
  for (size_t i = 0; i < a.sequences.size(); ++i) {
    if (a.sequences[i].first.tenant != b.sequences[i].first.tenant ||
        a.sequences[i].first.id != b.sequences[i].first.id ||
        !(a.sequences[i].second == b.sequences[i].second)) {
      return false;
    }
  }
  return a.open == b.open && a.free_conv == b.free_conv && a.free_state == b.free_state &&
         a.free_pages == b.free_pages && a.flushes == b.flushes && a.verified == b.verified &&
         a.accepted == b.accepted;
}

// Checks the output of a successful layer call against what its request asks.
template <typename Request>
void CheckLayerOutput(const Request& r, bool decode, const v1::LayerOutput& out,
                      const ModelConfig& m) {
  int64_t tokens = 0;
  for (const v1::SequenceTokens& s : r.sequences()) {
    tokens += decode && s.num_tokens() == 0 ? 1 : s.num_tokens();
  }
  const v1::DType want =
      r.output_dtype() == v1::DTYPE_UNSPECIFIED ? r.qkv().dtype() : r.output_dtype();
  if (out.output().dtype() != want) Fail("output dtype differs from the one asked");
  if (out.output().shape_size() != 3 || out.output().shape(0) != tokens ||
      out.output().shape(1) != m.num_v_heads || out.output().shape(2) != m.head_v_dim) {
    Fail(absl::StrCat("output shape is not [", tokens, ", HV, V]"));
  }
  const size_t elem = want == v1::FP32 ? 4 : 2;
  if (out.output().data().size() != static_cast<size_t>(tokens) * m.out_elems() * elem) {
    Fail("output data size does not match its shape");
  }
  if (out.positions_size() != r.sequences_size()) Fail("one position per sequence expected");
}

}  // namespace

std::string TenantFor(uint64_t request_id) {
  switch (request_id % 3) {
    case 0:
      return "a";
    case 1:
      return "b";
    default:
      return "";
  }
}

EngineOptions FixtureOptions() {
  EngineOptions o;
  if (!ModelPreset("tiny", &o.model)) Fail("no tiny preset");
  o.flush_interval = 8;
  o.stateless_limit = 16;
  o.max_drafts = 4;
  o.max_sequences = 8;
  o.max_sequences_per_tenant = 5;
  o.state_slots = 3;
  o.buffer_pages = 24;
  o.page_tokens = 4;
  o.replay_max_tokens = 64;
  return o;
}

Fixture::Fixture() {
  absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(FixtureOptions(), MakeCpuBackend());
  if (!e.ok()) Fail(absl::StrCat("engine: ", e.status().ToString()));
  engine_ = *std::move(e);
  server::ServerIdentity identity;
  identity.version = "fuzz";
  handler_ = std::make_unique<server::RequestHandler>(engine_.get(), identity);
  if (!engine_->Open("a", {1, 2, 3}).ok() || !engine_->Open("b", {1}).ok()) Fail("fixture open");
  for (int32_t l = 0; l < engine_->options().model.num_layers; ++l) {
    EngineStep(*engine_, "a", StepKind::kPrefill, l,
               {{1, 0, kPosA1}, {2, 0, kPosA2}, {3, 0, kPosA3}});
    EngineStep(*engine_, "b", StepKind::kPrefill, l, {{1, 0, kPosB1}});
    EngineStep(*engine_, "a", StepKind::kVerify, l, {{3, kPosA3, kDraftsA3}});
  }
}

v1::StreamResponse Fixture::RunAndCheck(const v1::StreamRequest& request) {
  const Snapshot before = Take(*engine_);
  v1::StreamResponse response;
  handler_->HandleStreamRequest(TenantFor(request.request_id()), request, &response);
  if (response.request_id() != request.request_id()) Fail("request_id not echoed");
  const int code = response.status_code();
  if (code < 0 || code > 16) Fail(absl::StrCat("status_code ", code, " is not a google.rpc.Code"));
  if (code != 0) {
    if (response.result_case() != v1::StreamResponse::RESULT_NOT_SET) Fail("error with a result");
    if (response.status_message().empty()) Fail("error without a message");
    if (response.status_message().size() > 2048) {
      Fail(absl::StrCat("error message of ", response.status_message().size(), " bytes"));
    }
    if (!SameState(before, Take(*engine_))) {
      Fail(absl::StrCat("a failed call changed the engine: ", response.status_message()));
    }
  } else {
    const ModelConfig& m = engine_->options().model;
    switch (request.call_case()) {
      case v1::StreamRequest::kPrefill:
        CheckLayerOutput(request.prefill(), false, response.layer_output(), m);
        break;
      case v1::StreamRequest::kDecodeStep:
        CheckLayerOutput(request.decode_step(), true, response.layer_output(), m);
        break;
      case v1::StreamRequest::kVerifyDrafts:
        CheckLayerOutput(request.verify_drafts(), false, response.layer_output(), m);
        break;
      case v1::StreamRequest::CALL_NOT_SET:
        Fail("a request without a call succeeded");
      default:
        break;
    }
  }
  std::string bytes;
  if (!response.SerializeToString(&bytes)) Fail("the response does not serialize");
  // Nothing is lost: closing every sequence returns every pool element.
  for (const SequenceKey& k : engine_->ListSequences()) {
    if (absl::Status s = engine_->Close(k.tenant, {k.id}); !s.ok()) Fail(s.ToString());
  }
  const EngineInfo info = engine_->Info();
  const EngineOptions& o = engine_->options();
  if (info.open_sequences != 0 || info.free_conv_slots != o.max_sequences ||
      info.free_state_slots != o.state_slots || info.free_buffer_pages != o.buffer_pages) {
    Fail("pool elements are missing after every sequence closed");
  }
  return response;
}

namespace {

// A per-layer request of kind `R` for (id, position, tokens) items on `layer`, in `dtype`.
template <typename R>
R LayerRequest(int32_t layer, const std::vector<std::tuple<uint64_t, int64_t, int32_t>>& items,
               DType dtype = DType::kBFloat16) {
  const EngineOptions o = FixtureOptions();
  const ModelConfig& m = o.model;
  R r;
  r.set_layer(layer);
  int64_t total = 0;
  for (auto [id, pos, n] : items) {
    v1::SequenceTokens* s = r.add_sequences();
    s->set_id(id);
    s->set_position(pos);
    s->set_num_tokens(n);
    total += n;
  }
  const int64_t qkv_shape[] = {total, m.channels()};
  const int64_t ab_shape[] = {total, m.num_v_heads};
  client::SetTensor(Values(static_cast<size_t>(total) * m.channels(), 3), qkv_shape, dtype,
                    r.mutable_qkv());
  client::SetTensor(Values(static_cast<size_t>(total) * m.num_v_heads, 5), ab_shape, dtype,
                    r.mutable_a());
  client::SetTensor(Values(static_cast<size_t>(total) * m.num_v_heads, 7), ab_shape, dtype,
                    r.mutable_b());
  return r;
}

}  // namespace

std::vector<std::pair<std::string, v1::StreamRequest>> SeedRequests() {
  std::vector<std::pair<std::string, v1::StreamRequest>> seeds;
  auto add = [&](std::string name, uint64_t id, auto fill) {
    v1::StreamRequest r;
    r.set_request_id(id);  // tenant "a" when id % 3 == 0, "b" when 1, "" when 2
    fill(&r);
    seeds.emplace_back(std::move(name), std::move(r));
  };
  // Valid calls of tenant a.
  add("decode_a", 3, [](auto* r) {
    *r->mutable_decode_step() =
        LayerRequest<v1::DecodeStepRequest>(0, {{1, kPosA1, 1}, {2, kPosA2, 1}});
  });
  add("decode_fp32_out_bf16", 6, [](auto* r) {
    *r->mutable_decode_step() =
        LayerRequest<v1::DecodeStepRequest>(1, {{2, kPosA2, 1}}, DType::kFloat32);
    r->mutable_decode_step()->mutable_sequences(0)->set_num_tokens(0);  // reads as 1
    r->mutable_decode_step()->set_output_dtype(v1::BF16);
  });
  add("prefill_a", 9, [](auto* r) {
    *r->mutable_prefill() = LayerRequest<v1::PrefillRequest>(0, {{1, kPosA1, 12}, {2, kPosA2, 3}});
  });
  add("prefill_fp16_chunked", 12, [](auto* r) {
    *r->mutable_prefill() = LayerRequest<v1::PrefillRequest>(1, {{1, kPosA1, 20}}, DType::kFloat16);
  });
  add("verify_a", 15, [](auto* r) {
    *r->mutable_verify_drafts() =
        LayerRequest<v1::VerifyDraftsRequest>(0, {{1, kPosA1, 4}, {2, kPosA2, 2}});
  });
  add("commit_a3", 18, [](auto* r) {
    v1::CommitItem* i = r->mutable_commit_drafts()->add_items();
    i->set_id(3);
    i->set_position(kPosA3);
    i->set_accepted(1);
  });
  add("flush_a", 21, [](auto* r) {
    r->mutable_flush()->add_ids(1);
    r->mutable_flush()->add_ids(2);
  });
  add("open_a", 24, [](auto* r) {
    r->mutable_open_sequences()->add_ids(7);
    r->mutable_open_sequences()->add_ids(8);
  });
  add("close_a", 27, [](auto* r) { r->mutable_close_sequences()->add_ids(2); });
  add("info", 30, [](auto* r) {
    auto* q = r->mutable_get_server_info()->add_capacity_queries();
    q->set_length(100);
    q->set_drafts(2);
  });
  // Tenant b, and no tenant: the same ids name other sequences, or none.
  add("decode_b", 1, [](auto* r) {
    *r->mutable_decode_step() = LayerRequest<v1::DecodeStepRequest>(0, {{1, kPosB1, 1}});
  });
  add("decode_b_names_a2", 4, [](auto* r) {
    *r->mutable_decode_step() = LayerRequest<v1::DecodeStepRequest>(0, {{2, kPosA2, 1}});
  });
  add("close_no_tenant", 2, [](auto* r) { r->mutable_close_sequences()->add_ids(1); });
  // Invalid calls.
  add("decode_stale_position", 33, [](auto* r) {
    *r->mutable_decode_step() = LayerRequest<v1::DecodeStepRequest>(0, {{1, kPosA1 - 1, 1}});
  });
  add("decode_drafts_pending", 36, [](auto* r) {
    *r->mutable_decode_step() = LayerRequest<v1::DecodeStepRequest>(0, {{3, kPosA3, 1}});
  });
  add("decode_nan", 39, [](auto* r) {
    *r->mutable_decode_step() =
        LayerRequest<v1::DecodeStepRequest>(0, {{1, kPosA1, 1}}, DType::kFloat32);
    float nan = std::numeric_limits<float>::quiet_NaN();
    r->mutable_decode_step()->mutable_qkv()->mutable_data()->replace(
        4, 4, reinterpret_cast<char*>(&nan), 4);
  });
  add("prefill_dtypes_differ", 42, [](auto* r) {
    *r->mutable_prefill() = LayerRequest<v1::PrefillRequest>(0, {{1, kPosA1, 2}});
    *r->mutable_prefill()->mutable_b() =
        LayerRequest<v1::PrefillRequest>(0, {{1, kPosA1, 2}}, DType::kFloat32).b();
  });
  add("prefill_chunked_takes_state", 45, [](auto* r) {
    *r->mutable_prefill() = LayerRequest<v1::PrefillRequest>(0, {{1, kPosA1, 30}});
  });
  add("commit_over", 48, [](auto* r) {
    v1::CommitItem* i = r->mutable_commit_drafts()->add_items();
    i->set_id(3);
    i->set_position(kPosA3);
    i->set_accepted(kDraftsA3 + 1);
  });
  add("open_over_quota", 51, [](auto* r) {
    for (uint64_t id : {10, 11, 12}) r->mutable_open_sequences()->add_ids(id);
  });
  add("shape_rank_3", 54, [](auto* r) {
    *r->mutable_decode_step() = LayerRequest<v1::DecodeStepRequest>(0, {{1, kPosA1, 1}});
    r->mutable_decode_step()->mutable_qkv()->add_shape(1);
  });
  add("empty_call", 57, [](auto*) {});
  return seeds;
}

}  // namespace kvbuffer::fuzz
