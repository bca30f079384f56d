#include "service/server/stream_reactor.h"

#include <algorithm>
#include <utility>

#include "service/server/call_context.h"
#include "service/server/status_conversion.h"

namespace kvbuffer::server {

namespace {

constexpr size_t kMaxFreeMessages = 8;

// The metrics name of the call a Stream request carries (false when none is set).
bool RpcOf(const v1::StreamRequest& request, metrics::Rpc* rpc) {
  switch (request.call_case()) {
    case v1::StreamRequest::kGetServerInfo:
      *rpc = metrics::Rpc::kGetServerInfo;
      return true;
    case v1::StreamRequest::kOpenSequences:
      *rpc = metrics::Rpc::kOpenSequences;
      return true;
    case v1::StreamRequest::kCloseSequences:
      *rpc = metrics::Rpc::kCloseSequences;
      return true;
    case v1::StreamRequest::kPrefill:
      *rpc = metrics::Rpc::kPrefill;
      return true;
    case v1::StreamRequest::kDecodeStep:
      *rpc = metrics::Rpc::kDecodeStep;
      return true;
    case v1::StreamRequest::kVerifyDrafts:
      *rpc = metrics::Rpc::kVerifyDrafts;
      return true;
    case v1::StreamRequest::kCommitDrafts:
      *rpc = metrics::Rpc::kCommitDrafts;
      return true;
    case v1::StreamRequest::kFlush:
      *rpc = metrics::Rpc::kFlush;
      return true;
    case v1::StreamRequest::CALL_NOT_SET:
      return false;
  }
  return false;
}

}  // namespace

StreamReactor::StreamReactor(grpc::CallbackServerContext* context,
                             absl::StatusOr<std::string> tenant, RequestHandler* handler,
                             Executor* executor, int window, metrics::ServiceMetrics* metrics)
    : context_(context),
      handler_(handler),
      executor_(executor),
      window_(std::max(window, 1)),
      tenant_(tenant.ok() ? *tenant : std::string()),
      metrics_(metrics),
      start_(absl::Now()) {
  if (!tenant.ok()) {
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;  // nothing is read, run or written
    }
    if (metrics_ != nullptr) {
      metrics_->ObserveRequest(metrics::Rpc::kStream, static_cast<int>(tenant.status().code()),
                               absl::ToDoubleSeconds(absl::Now() - start_));
    }
    Finish(ToGrpcStatus(tenant.status()));
    return;
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    actions = NextActions();
  }
  Perform(actions);
}

StreamReactor::Actions StreamReactor::NextActions() {
  Actions a;
  if (finished_) return a;
  const size_t outstanding =
      pending_.size() + answered_.size() + (writing_ ? 1 : 0) + (processing_ ? 1 : 0);
  if (!reading_ && !reads_done_ && !broken_ && outstanding < static_cast<size_t>(window_)) {
    if (free_requests_.empty()) {
      reading_ = std::make_unique<v1::StreamRequest>();
    } else {
      reading_ = std::move(free_requests_.back());
      free_requests_.pop_back();
    }
    a.read = reading_.get();
  }
  if (!worker_scheduled_ && !pending_.empty() && !broken_) {
    worker_scheduled_ = true;
    a.schedule = true;
  }
  if (!writing_ && !answered_.empty() && !broken_) {
    writing_ = std::move(answered_.front());
    answered_.pop_front();
    a.write = writing_.get();
  }
  const bool drained = reads_done_ && pending_.empty() && answered_.empty();
  if (!reading_ && !worker_scheduled_ && !writing_ && (broken_ || drained)) {
    finished_ = true;
    a.finish = true;
    a.finish_ok = !broken_;
  }
  return a;
}

void StreamReactor::Perform(const Actions& actions) {
  // Each flag set in `actions` was claimed under mu_, which keeps Finish from being chosen by
  // another thread until it completes; so `this` stays alive through the calls below.
  if (actions.schedule) executor_->Schedule([this] { ProcessOne(); });
  if (actions.read) StartRead(actions.read);
  if (actions.write) StartWrite(actions.write);
  if (actions.finish) {
    if (metrics_ != nullptr) {
      metrics_->ObserveRequest(
          metrics::Rpc::kStream,
          static_cast<int>(actions.finish_ok ? grpc::StatusCode::OK : grpc::StatusCode::CANCELLED),
          absl::ToDoubleSeconds(absl::Now() - start_));
    }
    Finish(actions.finish_ok ? grpc::Status::OK
                             : grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
  }
}

void StreamReactor::ProcessOne() {
  std::unique_ptr<v1::StreamRequest> request;
  std::unique_ptr<v1::StreamResponse> response;
  absl::Time read_at;
  {
    absl::MutexLock lock(&mu_);
    if (!broken_ && !pending_.empty()) {
      request = std::move(pending_.front().first);
      read_at = pending_.front().second;
      pending_.pop_front();
      if (free_responses_.empty()) {
        response = std::make_unique<v1::StreamResponse>();
      } else {
        response = std::move(free_responses_.back());
        free_responses_.pop_back();
      }
      processing_ = true;
    }
  }
  if (request) {
    absl::Status wanted = CheckCallStillWanted(*context_, "Stream request");
    if (wanted.ok()) {
      handler_->HandleStreamRequest(tenant_, *request, response.get());
    } else {
      response->set_request_id(request->request_id());
      SetStreamStatus(wanted, response.get());
    }
    metrics::Rpc rpc;
    if (metrics_ != nullptr && RpcOf(*request, &rpc)) {
      metrics_->ObserveRequest(rpc, response->status_code(),
                               absl::ToDoubleSeconds(absl::Now() - read_at));
      metrics_->AddBytes(static_cast<int64_t>(request->ByteSizeLong()),
                         static_cast<int64_t>(response->ByteSizeLong()));
    }
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    processing_ = false;
    worker_scheduled_ = false;
    if (request) Recycle(std::move(request));
    if (response) {
      if (broken_) {
        Recycle(std::move(response));
      } else {
        answered_.push_back(std::move(response));
      }
    }
    // One request per job keeps streams fair on a shared executor; NextActions reschedules.
    actions = NextActions();
  }
  Perform(actions);
}

void StreamReactor::OnReadDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<v1::StreamRequest> request = std::move(reading_);
    if (ok && !broken_) {
      pending_.emplace_back(std::move(request), absl::Now());
    } else {
      if (!ok) reads_done_ = true;
      Recycle(std::move(request));
    }
    actions = NextActions();
  }
  Perform(actions);
}

void StreamReactor::OnWriteDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    Recycle(std::move(writing_));
    if (!ok) broken_ = true;
    if (broken_) {
      pending_.clear();
      answered_.clear();
    }
    actions = NextActions();
  }
  Perform(actions);
}

void StreamReactor::OnCancel() {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    broken_ = true;
    pending_.clear();
    answered_.clear();
    actions = NextActions();
  }
  Perform(actions);
}

void StreamReactor::OnDone() { delete this; }

void StreamReactor::Recycle(std::unique_ptr<v1::StreamRequest> request) {
  if (!request || free_requests_.size() >= kMaxFreeMessages) return;
  request->Clear();
  free_requests_.push_back(std::move(request));
}

void StreamReactor::Recycle(std::unique_ptr<v1::StreamResponse> response) {
  if (!response || free_responses_.size() >= kMaxFreeMessages) return;
  response->Clear();
  free_responses_.push_back(std::move(response));
}

}  // namespace kvbuffer::server
