#include "service/server/attention_service_impl.h"

#include "service/server/call_context.h"
#include "service/server/happens_before.h"
#include "service/server/status_conversion.h"
#include "service/server/stream_reactor.h"

namespace kvbuffer::server {

namespace {

// The reactor of one unary call: what gRPC's DefaultReactor does (Finish, nothing else), plus the
// order gRPC guarantees but TSan cannot see through gRPC core (happens_before.h). An executor
// thread fills the response and finishes the call; gRPC then calls OnDone on one of its threads
// and after it, on that thread, destroys the request, the response and the call's objects.
class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  // Everything this thread did (the response filled) happens before OnDone.
  void FinishCall(const grpc::Status& status) {
    HappensBefore(this);
    Finish(status);
  }

  void OnDone() override {
    HappensAfter(this);
    delete this;
  }
};

}  // namespace

AttentionServiceImpl::AttentionServiceImpl(RequestHandler* handler, Executor* executor,
                                           int stream_window, const TenantResolver* tenants,
                                           metrics::ServiceMetrics* metrics,
                                           const RequestLog* request_log)
    : handler_(handler),
      executor_(executor),
      stream_window_(stream_window),
      tenants_(tenants),
      metrics_(metrics),
      request_log_(request_log) {}

template <typename Request, typename Response>
grpc::ServerUnaryReactor* AttentionServiceImpl::RunUnary(
    grpc::CallbackServerContext* context, const Request* request, Response* response,
    metrics::Rpc rpc,
    absl::Status (RequestHandler::*method)(const std::string&, const Request&, Response*)) {
  UnaryReactor* reactor = new UnaryReactor();  // deletes itself in OnDone
  RequestHandler* handler = handler_;
  metrics::ServiceMetrics* m = metrics_;
  const RequestLog* log = request_log_;
  const absl::Time start = absl::Now();
  // The request id and peer are taken here, before anything is sent on the call.
  std::string request_id = log != nullptr ? log->BeginCall(context) : std::string();
  std::string peer = log != nullptr ? context->peer() : std::string();
  // The tenant is resolved here, on the gRPC thread: an unauthenticated call never queues.
  absl::StatusOr<std::string> tenant = tenants_->Resolve(*context);
  if (!tenant.ok()) {
    if (m != nullptr) {
      m->ObserveRequest(rpc, static_cast<int>(tenant.status().code()),
                        absl::ToDoubleSeconds(absl::Now() - start));
    }
    if (log != nullptr) {
      CallRecord record;
      record.request_id = request_id;
      record.rpc = metrics::RpcName(rpc);
      record.peer = peer;
      record.code = static_cast<int>(tenant.status().code());
      record.latency_seconds = absl::ToDoubleSeconds(absl::Now() - start);
      record.counts = CountsOf(*request);
      record.request_bytes = static_cast<int64_t>(request->ByteSizeLong());
      log->Log(record);
    }
    reactor->FinishCall(ToGrpcStatus(tenant.status()));
    return reactor;
  }
  // context, request and response stay valid until Finish is called.
  executor_->Schedule(
      [=, tenant = *std::move(tenant), request_id = std::move(request_id), peer = std::move(peer)] {
        const std::string_view name = metrics::RpcName(rpc);
        absl::Status status =
            CheckCallStillWanted(*context, absl::string_view(name.data(), name.size()));
        if (status.ok()) status = (handler->*method)(tenant, *request, response);
        if (m != nullptr) {
          m->ObserveRequest(rpc, static_cast<int>(status.code()),
                            absl::ToDoubleSeconds(absl::Now() - start));
          m->AddBytes(static_cast<int64_t>(request->ByteSizeLong()),
                      status.ok() ? static_cast<int64_t>(response->ByteSizeLong()) : 0);
        }
        if (log != nullptr) {
          CallRecord record;
          record.request_id = request_id;
          record.rpc = name;
          record.tenant = tenant;
          record.peer = peer;
          record.code = static_cast<int>(status.code());
          record.latency_seconds = absl::ToDoubleSeconds(absl::Now() - start);
          record.counts = CountsOf(*request);
          record.request_bytes = static_cast<int64_t>(request->ByteSizeLong());
          record.response_bytes = status.ok() ? static_cast<int64_t>(response->ByteSizeLong()) : 0;
          log->Log(record);
        }
        reactor->FinishCall(ToGrpcStatus(status));
      });
  return reactor;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* request,
    v1::GetServerInfoResponse* response) {
  return RunUnary(context, request, response, metrics::Rpc::kGetServerInfo,
                  &RequestHandler::GetServerInfo);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::OpenSequences(
    grpc::CallbackServerContext* context, const v1::OpenSequencesRequest* request,
    v1::OpenSequencesResponse* response) {
  return RunUnary(context, request, response, metrics::Rpc::kOpenSequences,
                  &RequestHandler::OpenSequences);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::CloseSequences(
    grpc::CallbackServerContext* context, const v1::CloseSequencesRequest* request,
    v1::CloseSequencesResponse* response) {
  return RunUnary(context, request, response, metrics::Rpc::kCloseSequences,
                  &RequestHandler::CloseSequences);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Prefill(grpc::CallbackServerContext* context,
                                                        const v1::PrefillRequest* request,
                                                        v1::LayerOutput* response) {
  return RunUnary(context, request, response, metrics::Rpc::kPrefill, &RequestHandler::Prefill);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::DecodeStep(grpc::CallbackServerContext* context,
                                                           const v1::DecodeStepRequest* request,
                                                           v1::LayerOutput* response) {
  return RunUnary(context, request, response, metrics::Rpc::kDecodeStep,
                  &RequestHandler::DecodeStep);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::VerifyDrafts(grpc::CallbackServerContext* context,
                                                             const v1::VerifyDraftsRequest* request,
                                                             v1::LayerOutput* response) {
  return RunUnary(context, request, response, metrics::Rpc::kVerifyDrafts,
                  &RequestHandler::VerifyDrafts);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::CommitDrafts(grpc::CallbackServerContext* context,
                                                             const v1::CommitDraftsRequest* request,
                                                             v1::CommitDraftsResponse* response) {
  return RunUnary(context, request, response, metrics::Rpc::kCommitDrafts,
                  &RequestHandler::CommitDrafts);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Flush(grpc::CallbackServerContext* context,
                                                      const v1::FlushRequest* request,
                                                      v1::FlushResponse* response) {
  return RunUnary(context, request, response, metrics::Rpc::kFlush, &RequestHandler::Flush);
}

grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>* AttentionServiceImpl::Stream(
    grpc::CallbackServerContext* context) {
  std::string request_id = request_log_ != nullptr ? request_log_->BeginCall(context) : "";
  return new StreamReactor(context, tenants_->Resolve(*context), handler_, executor_,
                           stream_window_, metrics_, request_log_, std::move(request_id));
}

}  // namespace kvbuffer::server
