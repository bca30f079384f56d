// kvbuffer.v1.AttentionService on gRPC's callback API: every call is handed to the executor, so
// engine work never runs on a gRPC thread; the Stream gets a StreamReactor.
#pragma once

#include "kvbuffer/v1/attention_service.grpc.pb.h"
#include "service/server/executor.h"
#include "service/server/metrics/service_metrics.h"
#include "service/server/request_handler.h"
#include "service/server/request_log.h"
#include "service/server/tenant_identity.h"

namespace kvbuffer::server {

class AttentionServiceImpl final : public v1::AttentionService::CallbackService {
 public:
  // `handler`, `executor`, `tenants`, `metrics` and `request_log` (both may be null) must outlive
  // every call; `stream_window` bounds the requests a Stream reads ahead of its answers. Every
  // call's tenant is resolved by `tenants` when it starts; an unauthenticated call does no work.
  // With a `request_log` every call gets a request id and is logged (request_log.h).
  AttentionServiceImpl(RequestHandler* handler, Executor* executor, int stream_window,
                       const TenantResolver* tenants, metrics::ServiceMetrics* metrics,
                       const RequestLog* request_log = nullptr);

  // The RPCs of kvbuffer.v1.AttentionService (semantics in docs/api.md). Each unary method
  // schedules its call on the executor and returns at once; Stream returns a StreamReactor.
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::GetServerInfoResponse* response) override;
  grpc::ServerUnaryReactor* OpenSequences(grpc::CallbackServerContext* context,
                                          const v1::OpenSequencesRequest* request,
                                          v1::OpenSequencesResponse* response) override;
  grpc::ServerUnaryReactor* CloseSequences(grpc::CallbackServerContext* context,
                                           const v1::CloseSequencesRequest* request,
                                           v1::CloseSequencesResponse* response) override;
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* context,
                                    const v1::PrefillRequest* request,
                                    v1::LayerOutput* response) override;
  grpc::ServerUnaryReactor* DecodeStep(grpc::CallbackServerContext* context,
                                       const v1::DecodeStepRequest* request,
                                       v1::LayerOutput* response) override;
  grpc::ServerUnaryReactor* VerifyDrafts(grpc::CallbackServerContext* context,
                                         const v1::VerifyDraftsRequest* request,
                                         v1::LayerOutput* response) override;
  grpc::ServerUnaryReactor* CommitDrafts(grpc::CallbackServerContext* context,
                                         const v1::CommitDraftsRequest* request,
                                         v1::CommitDraftsResponse* response) override;
  grpc::ServerUnaryReactor* Flush(grpc::CallbackServerContext* context,
                                  const v1::FlushRequest* request,
                                  v1::FlushResponse* response) override;
  grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>* Stream(
      grpc::CallbackServerContext* context) override;

 private:
  // Runs handler method `method` for a unary call on the executor, records it as `rpc` in the
  // metrics and finishes the call.
  template <typename Request, typename Response>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* context, const Request* request,
                                     Response* response, metrics::Rpc rpc,
                                     absl::Status (RequestHandler::*method)(const std::string&,
                                                                            const Request&,
                                                                            Response*));

  RequestHandler* handler_;
  Executor* executor_;
  int stream_window_;
  const TenantResolver* tenants_;
  metrics::ServiceMetrics* metrics_;
  const RequestLog* request_log_;  // may be null
};

}  // namespace kvbuffer::server
