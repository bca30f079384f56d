#include "service/server/stream_reactor.h"

#include <algorithm>
#include <utility>

#include "service/server/call_context.h"
#include "service/server/happens_before.h"
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
                             Executor* executor, int window, metrics::ServiceMetrics* metrics,
                             const RequestLog* request_log, std::string request_id)
    : context_(context),
      handler_(handler),
      executor_(executor),
      window_(std::max(window, 1)),
      tenant_(tenant.ok() ? *tenant : std::string()),
      metrics_(metrics),
      start_(absl::Now()),
      request_log_(request_log),
      request_id_(std::move(request_id)),
      peer_(request_log != nullptr ? context->peer() : std::string()) {
  // gRPC runs no reaction before the reactor is built (the start of each pairs with this).
  HappensBefore(this);
  if (!tenant.ok()) {
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;  // nothing is read, run or written
    }
    if (metrics_ != nullptr) {
      metrics_->ObserveRequest(metrics::Rpc::kStream, static_cast<int>(tenant.status().code()),
                               absl::ToDoubleSeconds(absl::Now() - start_));
    }
    LogStream(static_cast<int>(tenant.status().code()));
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
    // Under mu_, which OnDone takes before destroying `this`: what the end reads of `this`
    // is then ordered before the destruction.
    RecordEnd(a.finish_ok);
  }
  return a;
}

void StreamReactor::Perform(const Actions& actions) {
  // Each flag set in `actions` was claimed under mu_, which keeps Finish from being chosen by
  // another thread until it completes; so `this` stays alive through the calls below.
  if (actions.schedule) executor_->Schedule([this] { ProcessOne(); });
  if (actions.read || actions.write) {
    absl::MutexLock lock(&start_mu_);
    if (actions.read) StartRead(actions.read);
    if (actions.write) StartWrite(actions.write);
  }
  if (actions.finish) {
    // Recorded by NextActions under mu_; nothing of `this` is read here but by gRPC's Finish.
    Finish(actions.finish_ok ? grpc::Status::OK
                             : grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
  }
}

void StreamReactor::RecordEnd(bool ok) {
  const int code = static_cast<int>(ok ? grpc::StatusCode::OK : grpc::StatusCode::CANCELLED);
  if (metrics_ != nullptr) {
    metrics_->ObserveRequest(metrics::Rpc::kStream, code,
                             absl::ToDoubleSeconds(absl::Now() - start_));
  }
  LogStream(code);
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
    if (request_log_ != nullptr) {
      const auto request_bytes = static_cast<int64_t>(request->ByteSizeLong());
      const auto response_bytes = static_cast<int64_t>(response->ByteSizeLong());
      ++logged_messages_;
      logged_request_bytes_ += request_bytes;
      logged_response_bytes_ += response_bytes;
      CallRecord record;
      record.request_id = request_id_;
      record.rpc = StreamCallName(*request);
      record.tenant = tenant_;
      record.peer = peer_;
      record.code = response->status_code();
      record.latency_seconds = absl::ToDoubleSeconds(absl::Now() - read_at);
      record.counts = CountsOf(*request);
      record.request_bytes = request_bytes;
      record.response_bytes = response_bytes;
      record.stream_request_id = request->request_id();
      request_log_->Log(record);
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
  HappensAfter(this);
  { absl::MutexLock lock(&start_mu_); }  // the StartRead of this request has returned
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
  HappensBefore(&reactions_end_);
}

void StreamReactor::OnWriteDone(bool ok) {
  HappensAfter(this);
  { absl::MutexLock lock(&start_mu_); }  // the StartWrite of this response has returned
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
  HappensBefore(&reactions_end_);
}

void StreamReactor::OnCancel() {
  HappensAfter(this);
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    broken_ = true;
    pending_.clear();
    answered_.clear();
    actions = NextActions();
  }
  Perform(actions);
  HappensBefore(&reactions_end_);
}

void StreamReactor::OnDone() {
  // gRPC calls OnDone after every other reaction has returned: make that order explicit (and
  // visible to ThreadSanitizer, which cannot see gRPC's) before the state is destroyed.
  HappensAfter(this);
  HappensAfter(&reactions_end_);
  { absl::MutexLock lock(&mu_); }
  delete this;
}

void StreamReactor::LogStream(int code) {
  if (request_log_ == nullptr) return;
  CallRecord record;
  record.request_id = request_id_;
  record.rpc = "Stream";
  record.tenant = tenant_;
  record.peer = peer_;
  record.code = code;
  record.latency_seconds = absl::ToDoubleSeconds(absl::Now() - start_);
  record.request_bytes = logged_request_bytes_;
  record.response_bytes = logged_response_bytes_;
  record.stream_messages = logged_messages_;
  request_log_->Log(record);
}

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
