// One Stream call: send calls, receive their answers in the order sent. A call's own failure
// comes back in its response (status_code/status_message) and the stream goes on; a broken
// stream fails every later Send/Receive with the stream's status. After a break, open a new
// session and send the unanswered calls again: positions make that safe (replayed answers).
//
// Thread safety: one thread may Send while another Receives; do not Send (or Receive) from two
// threads at once. Keep the number of unanswered calls below the server's stream window
// (--stream_window, 64 by default) or Send may block until answers are read.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/sync_stream.h"
#include "kvbuffer/v1/attention_service.grpc.pb.h"

namespace kvbuffer::client {

class StreamSession {
 public:
  // Opens the stream on `stub`; its whole life is bounded by `timeout`; a non-empty
  // `bearer_token` is sent as "authorization: Bearer <token>".
  StreamSession(v1::AttentionService::Stub* stub, absl::Duration timeout,
                const std::string& bearer_token = "");
  // Cancels the stream unless Close ran.
  ~StreamSession();

  StreamSession(const StreamSession&) = delete;
  StreamSession& operator=(const StreamSession&) = delete;

  // Sets request->request_id to the next id, sends it and returns the id. Blocks while flow
  // control holds it back.
  absl::StatusOr<uint64_t> Send(v1::StreamRequest* request);

  // Receives the answer to the oldest unanswered call into `response`. An error here is the
  // stream's (broken, or an answer out of order); the call's status is in the response.
  absl::Status Receive(v1::StreamResponse* response);

  // Send then Receive; returns the stream's error (its final status when it ended) or else the
  // call's status.
  absl::Status Call(v1::StreamRequest* request, v1::StreamResponse* response);

  // Typed calls: the request is moved into the stream message (no copy of its tensors).
  absl::StatusOr<v1::LayerOutput> Prefill(v1::PrefillRequest&& request);
  absl::StatusOr<v1::LayerOutput> DecodeStep(v1::DecodeStepRequest&& request);
  absl::StatusOr<v1::LayerOutput> VerifyDrafts(v1::VerifyDraftsRequest&& request);
  absl::Status CommitDrafts(v1::CommitDraftsRequest&& request);
  absl::Status Flush(v1::FlushRequest&& request);
  absl::Status OpenSequences(v1::OpenSequencesRequest&& request);
  absl::Status CloseSequences(v1::CloseSequencesRequest&& request);
  absl::StatusOr<v1::GetServerInfoResponse> GetServerInfo(v1::GetServerInfoRequest&& request);

  // Half-closes, reads any answers still due (FAILED_PRECONDITION if calls were left
  // unanswered), and returns the stream's final status.
  absl::Status Close();

  // Calls sent and not yet received.
  int64_t unanswered();

 private:
  absl::Status Broken() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StreamRequest, v1::StreamResponse>> stream_;
  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<uint64_t> unanswered_ ABSL_GUARDED_BY(mu_);
  bool writes_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvbuffer::client
