#include "client/cpp/stream_session.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/cpp/client_credentials.h"
#include "client/cpp/client_status.h"

namespace kvbuffer::client {

StreamSession::StreamSession(v1::AttentionService::Stub* stub, absl::Duration timeout,
                             const std::string& bearer_token) {
  context_.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
  AddBearerToken(bearer_token, &context_);
  stream_ = stub->Stream(&context_);
}

StreamSession::~StreamSession() {
  absl::MutexLock lock(&mu_);
  if (!finished_) {
    context_.TryCancel();
    FinishLocked();
  }
}

void StreamSession::FinishLocked() {
  if (finished_) return;
  finished_ = true;
  // After a cancel or a failed read; Finish drains what is left.
  final_status_ = FromGrpcStatus(stream_->Finish());
  if (final_status_.ok() && !unanswered_.empty()) {
    final_status_ = absl::DataLossError(
        absl::StrCat("stream ended with ", unanswered_.size(), " call(s) unanswered"));
  }
}

absl::Status StreamSession::Broken() {
  if (!final_status_.ok()) return final_status_;
  return absl::FailedPreconditionError("stream is closed");
}

absl::StatusOr<uint64_t> StreamSession::Send(v1::StreamRequest* request) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_ || writes_done_) return Broken();
    request->set_request_id(next_id_++);
    unanswered_.push_back(request->request_id());
  }
  if (!stream_->Write(*request)) {
    // The stream broke; Receive (or Close) reads its final status.
    absl::MutexLock lock(&mu_);
    writes_done_ = true;
    return absl::UnavailableError("stream broken while sending; Receive reports why");
  }
  return request->request_id();
}

absl::Status StreamSession::Receive(v1::StreamResponse* response) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return Broken();
    if (unanswered_.empty()) {
      return absl::FailedPreconditionError("Receive with no call awaiting an answer");
    }
  }
  const bool ok = stream_->Read(response);
  absl::MutexLock lock(&mu_);
  if (!ok) {
    FinishLocked();
    return Broken();
  }
  const uint64_t want = unanswered_.front();
  if (response->request_id() != want) {
    context_.TryCancel();
    FinishLocked();
    final_status_ =
        absl::InternalError(absl::StrCat("answer for request ", response->request_id(),
                                         " arrived while ", want, " was the oldest unanswered"));
    return final_status_;
  }
  unanswered_.pop_front();
  return absl::OkStatus();
}

absl::Status StreamSession::Call(v1::StreamRequest* request, v1::StreamResponse* response) {
  absl::StatusOr<uint64_t> id = Send(request);
  if (!id.ok()) {
    // A write fails once the server ended the stream (say, UNAUTHENTICATED): reading the end of
    // the stream gives its final status, which says why.
    if (absl::Status why = Receive(response); !why.ok()) return why;
    return id.status();
  }
  if (absl::Status s = Receive(response); !s.ok()) return s;
  return FromStreamResponse(*response);
}

namespace {

// Runs one typed call on `session` and hands back the typed result.
template <typename Result, typename SetRequest, typename TakeResult>
absl::StatusOr<Result> TypedCall(StreamSession* session, SetRequest set_request,
                                 TakeResult take_result) {
  v1::StreamRequest request;
  set_request(&request);
  v1::StreamResponse response;
  if (absl::Status s = session->Call(&request, &response); !s.ok()) return s;
  return take_result(&response);
}

}  // namespace

absl::StatusOr<v1::LayerOutput> StreamSession::Prefill(v1::PrefillRequest&& request) {
  return TypedCall<v1::LayerOutput>(
      this, [&](v1::StreamRequest* r) { r->mutable_prefill()->Swap(&request); },
      [](v1::StreamResponse* r) { return std::move(*r->mutable_layer_output()); });
}

absl::StatusOr<v1::LayerOutput> StreamSession::DecodeStep(v1::DecodeStepRequest&& request) {
  return TypedCall<v1::LayerOutput>(
      this, [&](v1::StreamRequest* r) { r->mutable_decode_step()->Swap(&request); },
      [](v1::StreamResponse* r) { return std::move(*r->mutable_layer_output()); });
}

absl::StatusOr<v1::LayerOutput> StreamSession::VerifyDrafts(v1::VerifyDraftsRequest&& request) {
  return TypedCall<v1::LayerOutput>(
      this, [&](v1::StreamRequest* r) { r->mutable_verify_drafts()->Swap(&request); },
      [](v1::StreamResponse* r) { return std::move(*r->mutable_layer_output()); });
}

absl::Status StreamSession::CommitDrafts(v1::CommitDraftsRequest&& request) {
  return TypedCall<bool>(
             this, [&](v1::StreamRequest* r) { r->mutable_commit_drafts()->Swap(&request); },
             [](v1::StreamResponse*) { return true; })
      .status();
}

absl::Status StreamSession::Flush(v1::FlushRequest&& request) {
  return TypedCall<bool>(
             this, [&](v1::StreamRequest* r) { r->mutable_flush()->Swap(&request); },
             [](v1::StreamResponse*) { return true; })
      .status();
}

absl::Status StreamSession::OpenSequences(v1::OpenSequencesRequest&& request) {
  return TypedCall<bool>(
             this, [&](v1::StreamRequest* r) { r->mutable_open_sequences()->Swap(&request); },
             [](v1::StreamResponse*) { return true; })
      .status();
}

absl::Status StreamSession::CloseSequences(v1::CloseSequencesRequest&& request) {
  return TypedCall<bool>(
             this, [&](v1::StreamRequest* r) { r->mutable_close_sequences()->Swap(&request); },
             [](v1::StreamResponse*) { return true; })
      .status();
}

absl::StatusOr<v1::GetServerInfoResponse> StreamSession::GetServerInfo(
    v1::GetServerInfoRequest&& request) {
  return TypedCall<v1::GetServerInfoResponse>(
      this, [&](v1::StreamRequest* r) { r->mutable_get_server_info()->Swap(&request); },
      [](v1::StreamResponse* r) { return std::move(*r->mutable_get_server_info()); });
}

absl::Status StreamSession::Close() {
  absl::MutexLock lock(&mu_);
  if (finished_) return final_status_;
  if (!writes_done_) stream_->WritesDone();
  writes_done_ = true;
  v1::StreamResponse extra;
  int64_t dropped = static_cast<int64_t>(unanswered_.size());
  while (stream_->Read(&extra)) {
    if (!unanswered_.empty()) unanswered_.pop_front();
  }
  unanswered_.clear();
  FinishLocked();
  if (final_status_.ok() && dropped > 0) {
    final_status_ = absl::FailedPreconditionError(
        absl::StrCat("Close with ", dropped, " call(s) unanswered; their answers were dropped"));
  }
  return final_status_;
}

int64_t StreamSession::unanswered() {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(unanswered_.size());
}

}  // namespace kvbuffer::client
