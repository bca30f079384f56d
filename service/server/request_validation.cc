#include "service/server/request_validation.h"

#include <limits>
#include <string>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "service/server/tensor_codec.h"

namespace kvbuffer::server {

namespace {

const char* KindName(StepKind kind) {
  switch (kind) {
    case StepKind::kPrefill:
      return "Prefill";
    case StepKind::kDecode:
      return "DecodeStep";
    case StepKind::kVerify:
      return "VerifyDrafts";
  }
  return "?";
}

// INVALID_ARGUMENT when ids[i] repeats an earlier entry: "<list>[i]<suffix> repeats ...".
template <typename GetId>
absl::Status CheckDistinct(absl::string_view list, absl::string_view suffix, absl::string_view what,
                           int n, GetId get_id) {
  std::unordered_map<uint64_t, int> first;
  first.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const uint64_t id = get_id(i);
    auto [it, inserted] = first.emplace(id, i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(list, "[", i, "]", suffix, " repeats ", what,
                                                     " ", id, " (", list, "[", it->second,
                                                     "]); each may appear once per call"));
    }
  }
  return absl::OkStatus();
}

// INVALID_ARGUMENT unless 1 <= n <= max entries.
absl::Status CheckCount(absl::string_view rpc, absl::string_view list, int n, int32_t max) {
  if (n < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(rpc, ": ", list, " must not be empty, expected 1 to ", max, " entries"));
  }
  if (n > max) {
    return absl::InvalidArgumentError(absl::StrCat(rpc, ": ", list, " has ", n,
                                                   " entries, expected at most ", max,
                                                   " (the server's max_sequences)"));
  }
  return absl::OkStatus();
}

// Decodes and checks one activation tensor of a layer request against [rows, width].
absl::Status CheckActivation(const char* field, bool present, const v1::Tensor& t, int64_t rows,
                             int32_t width, const char* width_name, TensorView* out) {
  if (!present) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is missing, expected a tensor of shape [", rows, ", ", width,
                     "] ([total_tokens, ", width_name, "])"));
  }
  if (absl::Status s = TensorViewFromProto(t, field, out); !s.ok()) return s;
  if (out->shape.size() != 2 || out->shape[0] != rows || out->shape[1] != width) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape must be [", rows, ", ", width,
                                                   "] ([total_tokens, ", width_name, "]), got ",
                                                   ShapeString(out->shape)));
  }
  return absl::OkStatus();
}

template <typename Request>
absl::Status ValidateLayer(StepKind kind, const Request& request, const RequestLimits& limits,
                           LayerCall* call) {
  const char* rpc = KindName(kind);
  if (request.layer() < 0 || request.layer() >= limits.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(rpc, ": layer must be in [0, ",
                                                   limits.num_layers, "), got ", request.layer()));
  }
  const int n = request.sequences_size();
  if (absl::Status s = CheckCount(rpc, "sequences", n, limits.max_ids); !s.ok()) return s;
  call->layer = request.layer();
  call->sequences.clear();
  call->sequences.reserve(static_cast<size_t>(n));
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    const v1::SequenceTokens& st = request.sequences(i);
    if (st.position() < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sequences[", i,
                                                     "].position must be >= 0 (committed tokens on "
                                                     "the layer), got ",
                                                     st.position()));
    }
    int32_t t = st.num_tokens();
    switch (kind) {
      case StepKind::kDecode:
        if (t == 0) t = 1;
        if (t != 1) {
          return absl::InvalidArgumentError(absl::StrCat(
              "sequences[", i, "].num_tokens must be 1 for DecodeStep (0 reads as 1), got ", t));
        }
        break;
      case StepKind::kVerify:
        if (t < 1 || t > limits.max_drafts) {
          return absl::InvalidArgumentError(absl::StrCat(
              "sequences[", i, "].num_tokens must be in [1, max_drafts=", limits.max_drafts,
              "] for VerifyDrafts, got ", t));
        }
        break;
      case StepKind::kPrefill:
        if (t < 1 || t > limits.max_prefill_tokens) {
          return absl::InvalidArgumentError(
              absl::StrCat("sequences[", i, "].num_tokens must be in [1, ",
                           limits.max_prefill_tokens, "] for Prefill, got ", t));
        }
        break;
    }
    call->sequences.push_back({st.id(), st.position(), t});
    total += t;
  }
  const int64_t max_total = std::numeric_limits<int32_t>::max() / std::max(1, limits.channels);
  if (total > max_total) {
    return absl::InvalidArgumentError(absl::StrCat(rpc, ": the sequences carry ", total,
                                                   " tokens in all, expected at most ", max_total,
                                                   " per call; split the call"));
  }
  if (absl::Status s = CheckDistinct("sequences", ".id", "sequence", n,
                                     [&](int i) { return request.sequences(i).id(); });
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckActivation("qkv", request.has_qkv(), request.qkv(), total,
                                       limits.channels, "channels", &call->qkv);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckActivation("a", request.has_a(), request.a(), total, limits.num_v_heads,
                                       "HV", &call->a);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckActivation("b", request.has_b(), request.b(), total, limits.num_v_heads,
                                       "HV", &call->b);
      !s.ok()) {
    return s;
  }
  for (auto [name, view] :
       {std::pair<const char*, const TensorView*>{"a", &call->a}, {"b", &call->b}}) {
    if (view->dtype != call->qkv.dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ".dtype is ", DTypeName(view->dtype), " but qkv.dtype is ",
                       DTypeName(call->qkv.dtype), "; qkv, a and b must share one dtype"));
    }
  }
  if (request.output_dtype() == v1::DTYPE_UNSPECIFIED) {
    call->out_dtype = call->qkv.dtype;
  } else {
    absl::StatusOr<DType> out = DTypeFromProto(request.output_dtype(), "output_dtype");
    if (!out.ok()) return out.status();
    call->out_dtype = *out;
  }
  return absl::OkStatus();
}

}  // namespace

RequestLimits LimitsFor(const EngineOptions& options) {
  RequestLimits l;
  l.num_layers = options.model.num_layers;
  l.channels = options.model.channels();
  l.num_v_heads = options.model.num_v_heads;
  l.max_drafts = options.max_drafts;
  l.max_ids = options.max_sequences;
  return l;
}

absl::Status ValidateGetServerInfo(const v1::GetServerInfoRequest& request,
                                   const RequestLimits& limits) {
  const int n = request.capacity_queries_size();
  if (n > limits.max_capacity_queries) {
    return absl::InvalidArgumentError(absl::StrCat("GetServerInfo: capacity_queries has ", n,
                                                   " entries, expected at most ",
                                                   limits.max_capacity_queries));
  }
  for (int i = 0; i < n; ++i) {
    const v1::CapacityQuery& q = request.capacity_queries(i);
    if (q.length() < 0 || q.length() > limits.max_capacity_length) {
      return absl::InvalidArgumentError(
          absl::StrCat("capacity_queries[", i, "].length must be in [0, ",
                       limits.max_capacity_length, "], got ", q.length()));
    }
    if (q.drafts() < 0 || q.drafts() > limits.max_drafts) {
      return absl::InvalidArgumentError(absl::StrCat(
          "capacity_queries[", i, "].drafts must be in [0, max_drafts=", limits.max_drafts,
          "], got ", q.drafts()));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateIds(absl::string_view rpc,
                         const google::protobuf::RepeatedField<uint64_t>& ids,
                         const RequestLimits& limits) {
  if (rpc == "OpenSequences" && ids.size() > limits.max_ids) {
    // Well formed, but more than the table can ever hold: the pool's code, not a malformed call.
    return absl::ResourceExhaustedError(absl::StrCat(
        "sequence table is full: ", ids.size(),
        " sequences asked, more than max_sequences=", limits.max_ids, " can ever be open"));
  }
  if (absl::Status s = CheckCount(rpc, "ids", ids.size(), limits.max_ids); !s.ok()) return s;
  return CheckDistinct("ids", "", "id", ids.size(), [&](int i) { return ids.Get(i); });
}

absl::Status ValidateCommitDrafts(const v1::CommitDraftsRequest& request,
                                  const RequestLimits& limits) {
  const int n = request.items_size();
  if (absl::Status s = CheckCount("CommitDrafts", "items", n, limits.max_ids); !s.ok()) return s;
  for (int i = 0; i < n; ++i) {
    const v1::CommitItem& item = request.items(i);
    if (item.position() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "items[", i, "].position must be >= 0 (where the drafts were verified), got ",
          item.position()));
    }
    if (item.accepted() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "items[", i, "].accepted must be >= 0 (drafts kept), got ", item.accepted()));
    }
  }
  return CheckDistinct("items", ".id", "sequence", n, [&](int i) { return request.items(i).id(); });
}

absl::Status ValidateLayerRequest(StepKind kind, const v1::PrefillRequest& request,
                                  const RequestLimits& limits, LayerCall* call) {
  return ValidateLayer(kind, request, limits, call);
}

absl::Status ValidateLayerRequest(StepKind kind, const v1::DecodeStepRequest& request,
                                  const RequestLimits& limits, LayerCall* call) {
  return ValidateLayer(kind, request, limits, call);
}

absl::Status ValidateLayerRequest(StepKind kind, const v1::VerifyDraftsRequest& request,
                                  const RequestLimits& limits, LayerCall* call) {
  return ValidateLayer(kind, request, limits, call);
}

}  // namespace kvbuffer::server
