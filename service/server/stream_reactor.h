// The reactor of one Stream call: reads requests ahead (up to a window), runs them strictly in
// order on the executor (one at a time per stream), and writes one response per request, in the
// same order, echoing its request_id. A failed call is answered in status_code/status_message and
// the stream goes on. The stream finishes OK after the client half-closes and every request has
// been answered; a cancelled stream drops what it had not run.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/support/server_callback.h"
#include "kvbuffer/v1/attention_service.pb.h"
#include "service/server/executor.h"
#include "service/server/metrics/service_metrics.h"
#include "service/server/request_handler.h"
#include "service/server/request_log.h"

namespace kvbuffer::server {

class StreamReactor final : public grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse> {
 public:
  // Starts reading for `tenant`; `window` (>= 1) bounds requests read but not yet answered on the
  // wire. When `tenant` is an error (the caller is not authenticated) the stream is finished with
  // it at once, before any request is read. With a `request_log` (may be null; must outlive the
  // stream) every message and the whole stream are logged under `request_id`.
  StreamReactor(grpc::CallbackServerContext* context, absl::StatusOr<std::string> tenant,
                RequestHandler* handler, Executor* executor, int window,
                metrics::ServiceMetrics* metrics, const RequestLog* request_log = nullptr,
                std::string request_id = {});

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // What a caller must start once it has released mu_. Finish is only ever chosen when nothing
  // else is in flight, so performing these is the last thing a caller does with `this`.
  struct Actions {
    v1::StreamRequest* read = nullptr;
    v1::StreamResponse* write = nullptr;
    bool schedule = false;
    bool finish = false;
    bool finish_ok = false;  // the client half-closed and every request was answered
  };

  Actions NextActions() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Perform(const Actions& actions);
  void ProcessOne();  // executor job: runs the oldest pending request
  void Recycle(std::unique_ptr<v1::StreamRequest> request) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Recycle(std::unique_ptr<v1::StreamResponse> response) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Logs the whole stream as finished with `code` (no-op without a request log).
  void LogStream(int code);
  // Records the end of the stream (metrics, request log) once Finish is chosen.
  void RecordEnd(bool ok) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  grpc::CallbackServerContext* const context_;
  RequestHandler* const handler_;
  Executor* const executor_;
  const int window_;
  const std::string tenant_;                // "" when unauthenticated (then nothing is ever run)
  metrics::ServiceMetrics* const metrics_;  // may be null
  const absl::Time start_;
  const RequestLog* const request_log_;  // may be null
  const std::string request_id_;
  const std::string peer_;
  // Totals for the stream's log record; only ProcessOne (one at a time) writes them, and the
  // finish that reads them is chosen under mu_ after the last ProcessOne.
  int64_t logged_messages_ = 0;
  int64_t logged_request_bytes_ = 0;
  int64_t logged_response_bytes_ = 0;

  // Held across StartRead and StartWrite (StartWrite serializes the response on the calling
  // thread). OnReadDone and OnWriteDone take it once before touching that message, so each is
  // explicitly ordered after the call that started it (gRPC never runs them inside it), also for
  // ThreadSanitizer, which cannot see gRPC's own ordering.
  absl::Mutex start_mu_;
  // The address whose HappensBefore ends every reaction and whose HappensAfter starts OnDone.
  char reactions_end_ = 0;
  absl::Mutex mu_;
  std::unique_ptr<v1::StreamRequest> reading_ ABSL_GUARDED_BY(mu_);  // target of the read
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  // Requests read and not yet run, with the time each was read.
  std::deque<std::pair<std::unique_ptr<v1::StreamRequest>, absl::Time>> pending_
      ABSL_GUARDED_BY(mu_);
  bool worker_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  bool processing_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::unique_ptr<v1::StreamResponse>> answered_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<v1::StreamResponse> writing_ ABSL_GUARDED_BY(mu_);
  bool broken_ ABSL_GUARDED_BY(mu_) = false;  // cancelled, or a write failed
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // Messages kept for reuse, so a long stream does not allocate them per call.
  std::vector<std::unique_ptr<v1::StreamRequest>> free_requests_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<v1::StreamResponse>> free_responses_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvbuffer::server
