#include "service/server/request_handler.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "service/server/request_validation.h"
#include "service/server/status_conversion.h"
#include "service/server/tensor_codec.h"

namespace kvbuffer::server {

namespace {

// Capacity rows reported when a GetServerInfo names none: short chat, long context, and long
// context with speculative decoding.
constexpr struct {
  int64_t length;
  int32_t drafts;
} kDefaultCapacityQueries[] = {{1024, 0}, {32768, 0}, {32768, 4}};

void FillEstimate(const CapacityEstimate& e, v1::CapacityEstimate* out) {
  out->set_length(e.length);
  out->set_drafts(e.drafts);
  out->set_kvbuffer_bytes_per_sequence(e.kvbuffer_bytes_per_sequence);
  out->set_recurrent_bytes_per_sequence(e.recurrent_bytes_per_sequence);
  out->set_max_sequences_now(e.max_sequences_now);
  out->set_max_sequences_at_equal_memory(e.max_sequences_at_equal_memory);
  out->set_recurrent_sequences_at_equal_memory(e.recurrent_sequences_at_equal_memory);
  out->set_ratio(e.ratio);
}

// Reusable scratch for turning a request into an engine call without allocating once warm.
LayerCall& ScratchLayerCall() {
  thread_local LayerCall call;
  return call;
}

}  // namespace

RequestHandler::RequestHandler(Engine* engine, ServerIdentity identity)
    : engine_(engine), identity_(std::move(identity)), limits_(LimitsFor(engine->options())) {}

absl::Status RequestHandler::GetServerInfo(const std::string& tenant,
                                           const v1::GetServerInfoRequest& request,
                                           v1::GetServerInfoResponse* response) {
  if (absl::Status s = ValidateGetServerInfo(request, limits_); !s.ok()) return s;
  const EngineInfo info = engine_->Info();
  const EngineOptions& o = info.options;
  response->set_version(identity_.version);
  response->set_backend(info.backend);

  v1::ModelShapes* model = response->mutable_model();
  model->set_name(o.model.name);
  model->set_num_layers(o.model.num_layers);
  model->set_num_k_heads(o.model.num_k_heads);
  model->set_num_v_heads(o.model.num_v_heads);
  model->set_head_k_dim(o.model.head_k_dim);
  model->set_head_v_dim(o.model.head_v_dim);
  model->set_conv_width(o.model.conv_width);
  model->set_channels(o.model.channels());
  model->set_param_seed(o.model.param_seed);
  model->set_params_source(identity_.params_source);

  v1::BufferSettings* buffer = response->mutable_buffer();
  buffer->set_flush_interval(o.flush_interval);
  buffer->set_stateless_limit(o.stateless_limit);
  buffer->set_max_drafts(o.max_drafts);
  buffer->set_page_tokens(o.page_tokens);
  buffer->set_buffer_dtype(DTypeToProto(o.buffer_dtype));
  buffer->set_conv_dtype(DTypeToProto(o.conv_dtype));
  buffer->set_state_dtype(v1::FP32);
  buffer->set_idle_ttl_seconds(absl::ToDoubleSeconds(o.idle_ttl));

  v1::Capacity* capacity = response->mutable_capacity();
  capacity->set_max_sequences(o.max_sequences);
  // The caller's own sequences (with authentication off every sequence is tenant ""'s); the pools
  // are shared, so their free counts are the server's.
  capacity->set_open_sequences(engine_->OpenSequencesOf(tenant));
  capacity->set_state_slots(o.state_slots);
  capacity->set_free_state_slots(info.free_state_slots);
  capacity->set_buffer_pages(o.buffer_pages);
  capacity->set_free_buffer_pages(info.free_buffer_pages);
  capacity->set_state_slot_bytes(info.element_bytes.state_slot);
  capacity->set_buffer_page_bytes(info.element_bytes.buffer_page);
  capacity->set_conv_slot_bytes(info.element_bytes.conv_slot);
  capacity->set_pool_bytes(info.memory.pool_bytes);
  capacity->set_device_total_bytes(info.memory.device_total_bytes);
  capacity->set_device_free_bytes(info.memory.device_free_bytes);
  if (request.capacity_queries().empty()) {
    for (const auto& q : kDefaultCapacityQueries) {
      FillEstimate(engine_->EstimateCapacity(q.length, q.drafts), capacity->add_estimates());
    }
  } else {
    for (const v1::CapacityQuery& q : request.capacity_queries()) {
      FillEstimate(engine_->EstimateCapacity(q.length(), q.drafts()), capacity->add_estimates());
    }
  }

  v1::Counters* counters = response->mutable_counters();
  counters->set_flushes(info.flushes);
  counters->set_drafts_verified(info.drafts_verified);
  counters->set_drafts_accepted(info.drafts_accepted);

  for (const std::string& f : identity_.features) response->add_features(f);
  response->set_max_message_bytes(identity_.max_message_bytes);
  response->set_tensor_parallel_size(identity_.tensor_parallel_size);
  return absl::OkStatus();
}

absl::Status RequestHandler::OpenSequences(const std::string& tenant,
                                           const v1::OpenSequencesRequest& request,
                                           v1::OpenSequencesResponse* /*response*/) {
  if (draining()) {
    return absl::UnavailableError(
        "server is draining (shutting down): OpenSequences refused; open new sequences on another "
        "replica, calls on already open sequences are still served until shutdown");
  }
  if (absl::Status s = ValidateIds("OpenSequences", request.ids(), limits_); !s.ok()) return s;
  return engine_->Open(tenant, {request.ids().begin(), request.ids().end()});
}

absl::Status RequestHandler::CloseSequences(const std::string& tenant,
                                            const v1::CloseSequencesRequest& request,
                                            v1::CloseSequencesResponse* /*response*/) {
  if (absl::Status s = ValidateIds("CloseSequences", request.ids(), limits_); !s.ok()) return s;
  return engine_->Close(tenant, {request.ids().begin(), request.ids().end()});
}

template <typename Request>
absl::Status RequestHandler::RunLayerCall(const std::string& tenant, const Request& request,
                                          StepKind kind, v1::LayerOutput* response) {
  LayerCall& call = ScratchLayerCall();
  call.tenant = tenant;
  if (absl::Status s = ValidateLayerRequest(kind, request, limits_, &call); !s.ok()) {
    call.qkv.data = call.a.data = call.b.data = nullptr;
    return s;
  }

  absl::StatusOr<LayerResult> result;
  switch (kind) {
    case StepKind::kPrefill:
      result = engine_->Prefill(call);
      break;
    case StepKind::kDecode:
      result = engine_->DecodeStep(call);
      break;
    case StepKind::kVerify:
      result = engine_->VerifyDrafts(call);
      break;
  }
  // The views borrow the request's bytes; drop them before the request goes away.
  call.qkv.data = call.a.data = call.b.data = nullptr;
  if (!result.ok()) return result.status();
  TensorToProto(std::move(result->out), response->mutable_output());
  response->set_replayed(result->replayed);
  response->mutable_positions()->Assign(result->positions.begin(), result->positions.end());
  return absl::OkStatus();
}

absl::Status RequestHandler::Prefill(const std::string& tenant, const v1::PrefillRequest& request,
                                     v1::LayerOutput* response) {
  return RunLayerCall(tenant, request, StepKind::kPrefill, response);
}

absl::Status RequestHandler::DecodeStep(const std::string& tenant,
                                        const v1::DecodeStepRequest& request,
                                        v1::LayerOutput* response) {
  return RunLayerCall(tenant, request, StepKind::kDecode, response);
}

absl::Status RequestHandler::VerifyDrafts(const std::string& tenant,
                                          const v1::VerifyDraftsRequest& request,
                                          v1::LayerOutput* response) {
  return RunLayerCall(tenant, request, StepKind::kVerify, response);
}

absl::Status RequestHandler::CommitDrafts(const std::string& tenant,
                                          const v1::CommitDraftsRequest& request,
                                          v1::CommitDraftsResponse* /*response*/) {
  if (absl::Status s = ValidateCommitDrafts(request, limits_); !s.ok()) return s;
  std::vector<CommitItem> items;
  items.reserve(request.items_size());
  for (const v1::CommitItem& item : request.items()) {
    items.push_back({item.id(), item.position(), item.accepted()});
  }
  return engine_->CommitDrafts(tenant, items);
}

absl::Status RequestHandler::Flush(const std::string& tenant, const v1::FlushRequest& request,
                                   v1::FlushResponse* /*response*/) {
  if (absl::Status s = ValidateIds("Flush", request.ids(), limits_); !s.ok()) return s;
  return engine_->Flush(tenant, {request.ids().begin(), request.ids().end()});
}

void RequestHandler::HandleStreamRequest(const std::string& tenant,
                                         const v1::StreamRequest& request,
                                         v1::StreamResponse* response) {
  response->set_request_id(request.request_id());
  absl::Status status;
  switch (request.call_case()) {
    case v1::StreamRequest::kGetServerInfo:
      status =
          GetServerInfo(tenant, request.get_server_info(), response->mutable_get_server_info());
      break;
    case v1::StreamRequest::kOpenSequences:
      status = OpenSequences(tenant, request.open_sequences(), response->mutable_open_sequences());
      break;
    case v1::StreamRequest::kCloseSequences:
      status =
          CloseSequences(tenant, request.close_sequences(), response->mutable_close_sequences());
      break;
    case v1::StreamRequest::kPrefill:
      status = Prefill(tenant, request.prefill(), response->mutable_layer_output());
      break;
    case v1::StreamRequest::kDecodeStep:
      status = DecodeStep(tenant, request.decode_step(), response->mutable_layer_output());
      break;
    case v1::StreamRequest::kVerifyDrafts:
      status = VerifyDrafts(tenant, request.verify_drafts(), response->mutable_layer_output());
      break;
    case v1::StreamRequest::kCommitDrafts:
      status = CommitDrafts(tenant, request.commit_drafts(), response->mutable_commit_drafts());
      break;
    case v1::StreamRequest::kFlush:
      status = Flush(tenant, request.flush(), response->mutable_flush());
      break;
    case v1::StreamRequest::CALL_NOT_SET:
      status = absl::InvalidArgumentError(
          "StreamRequest.call is not set (or holds a call this server does not know), expected "
          "one of get_server_info, open_sequences, close_sequences, prefill, decode_step, "
          "verify_drafts, commit_drafts, flush");
      break;
  }
  if (!status.ok()) response->clear_result();
  SetStreamStatus(status, response);
}

}  // namespace kvbuffer::server
