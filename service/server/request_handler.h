// Each RPC's request turned into engine calls and its response filled, shared by the unary
// methods and the Stream. Runs on executor threads; knows protobuf, not the gRPC call machinery.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvbuffer/v1/attention_service.pb.h"
#include "service/engine/engine.h"
#include "service/server/request_validation.h"

namespace kvbuffer::server {

// What the server says about itself beyond the engine.
struct ServerIdentity {
  std::string version;
  int64_t max_message_bytes = 0;
  std::vector<std::string> features;
  int32_t tensor_parallel_size = 1;
  std::string params_source = "seed";  // "seed" or the checkpoint the parameters came from
};

class RequestHandler {
 public:
  // `engine` must outlive the handler.
  RequestHandler(Engine* engine, ServerIdentity identity);

  // Fills model shapes, buffer settings, capacity (answering the request's queries, or a default
  // set), counters and identity.
  absl::Status GetServerInfo(const std::string& tenant, const v1::GetServerInfoRequest& request,
                             v1::GetServerInfoResponse* response);

  // Opens sequences; UNAVAILABLE while the server drains.
  absl::Status OpenSequences(const std::string& tenant, const v1::OpenSequencesRequest& request,
                             v1::OpenSequencesResponse* response);

  // Closes sequences.
  absl::Status CloseSequences(const std::string& tenant, const v1::CloseSequencesRequest& request,
                              v1::CloseSequencesResponse* response);

  // Runs a Prefill; the outputs are moved into `response`.
  absl::Status Prefill(const std::string& tenant, const v1::PrefillRequest& request,
                       v1::LayerOutput* response);

  // Runs a DecodeStep (num_tokens 0 reads as 1).
  absl::Status DecodeStep(const std::string& tenant, const v1::DecodeStepRequest& request,
                          v1::LayerOutput* response);

  // Runs a VerifyDrafts.
  absl::Status VerifyDrafts(const std::string& tenant, const v1::VerifyDraftsRequest& request,
                            v1::LayerOutput* response);

  // Commits accepted draft prefixes on every layer.
  absl::Status CommitDrafts(const std::string& tenant, const v1::CommitDraftsRequest& request,
                            v1::CommitDraftsResponse* response);

  // Folds buffers into states now.
  absl::Status Flush(const std::string& tenant, const v1::FlushRequest& request,
                     v1::FlushResponse* response);

  // Runs the call carried by a Stream request and fills `response` (request_id, status, result).
  void HandleStreamRequest(const std::string& tenant, const v1::StreamRequest& request,
                           v1::StreamResponse* response);

  // From now on OpenSequences answers UNAVAILABLE; calls on open sequences are still served.
  void StartDraining() { draining_.store(true, std::memory_order_release); }
  bool draining() const { return draining_.load(std::memory_order_acquire); }

 private:
  template <typename Request>
  absl::Status RunLayerCall(const std::string& tenant, const Request& request, StepKind kind,
                            v1::LayerOutput* response);

  Engine* engine_;
  ServerIdentity identity_;
  RequestLimits limits_;
  std::atomic<bool> draining_{false};
};

}  // namespace kvbuffer::server
