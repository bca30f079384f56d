#include "client/cpp/kvbuffer_client.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/cpp/client_status.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace kvbuffer::client {

namespace {

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoNanoseconds(d);
}

}  // namespace

grpc::ChannelArguments Client::ChannelArgumentsFor(const ClientOptions& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.tls.enabled && !options.tls.server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls.server_name);
  }
  return args;
}

std::unique_ptr<Client> Client::Connect(const std::string& target, ClientOptions options) {
  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
      target, ChannelCredentialsFor(options.tls), ChannelArgumentsFor(options));
  return std::make_unique<Client>(std::move(channel), options);
}

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(std::move(channel)),
      options_(options),
      stub_(v1::AttentionService::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

template <typename Attempt>
absl::Status Client::WithRetries(const CallOptions& call, absl::StatusCode ok_on_retry,
                                 Attempt attempt) {
  const int max_attempts =
      std::max(call.max_attempts > 0 ? call.max_attempts : options_.max_attempts, 1);
  const absl::Duration timeout =
      call.timeout > absl::ZeroDuration() ? call.timeout : options_.timeout;
  absl::Duration backoff = options_.initial_backoff;
  thread_local absl::BitGen jitter;
  absl::Status status;
  for (int i = 1; i <= max_attempts; ++i) {
    if (call.attempts) *call.attempts = i;
    grpc::ClientContext context;
    context.set_deadline(DeadlineAfter(timeout));
    AddBearerToken(options_.bearer_token, &context);
    status = FromGrpcStatus(attempt(&context));
    if (status.ok()) return status;
    if (i > 1 && status.code() == ok_on_retry) return absl::OkStatus();
    if (!IsRetryable(status.code()) || i == max_attempts) break;
    absl::SleepFor(backoff * absl::Uniform(jitter, 0.5, 1.0));
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
  return status;
}

absl::StatusOr<v1::GetServerInfoResponse> Client::GetServerInfo(
    const v1::GetServerInfoRequest& request, const CallOptions& call) {
  v1::GetServerInfoResponse response;
  absl::Status s = WithRetries(call, absl::StatusCode::kOk, [&](grpc::ClientContext* c) {
    return stub_->GetServerInfo(c, request, &response);
  });
  if (!s.ok()) return s;
  return response;
}

absl::Status Client::OpenSequences(absl::Span<const uint64_t> ids, const CallOptions& call) {
  v1::OpenSequencesRequest request;
  request.mutable_ids()->Assign(ids.begin(), ids.end());
  v1::OpenSequencesResponse response;
  return WithRetries(call, absl::StatusCode::kAlreadyExists, [&](grpc::ClientContext* c) {
    return stub_->OpenSequences(c, request, &response);
  });
}

absl::Status Client::CloseSequences(absl::Span<const uint64_t> ids, const CallOptions& call) {
  v1::CloseSequencesRequest request;
  request.mutable_ids()->Assign(ids.begin(), ids.end());
  v1::CloseSequencesResponse response;
  return WithRetries(call, absl::StatusCode::kNotFound, [&](grpc::ClientContext* c) {
    return stub_->CloseSequences(c, request, &response);
  });
}

absl::Status Client::Prefill(const v1::PrefillRequest& request, v1::LayerOutput* response,
                             const CallOptions& call) {
  return WithRetries(call, absl::StatusCode::kOk,
                     [&](grpc::ClientContext* c) { return stub_->Prefill(c, request, response); });
}

absl::Status Client::DecodeStep(const v1::DecodeStepRequest& request, v1::LayerOutput* response,
                                const CallOptions& call) {
  return WithRetries(call, absl::StatusCode::kOk, [&](grpc::ClientContext* c) {
    return stub_->DecodeStep(c, request, response);
  });
}

absl::Status Client::VerifyDrafts(const v1::VerifyDraftsRequest& request, v1::LayerOutput* response,
                                  const CallOptions& call) {
  return WithRetries(call, absl::StatusCode::kOk, [&](grpc::ClientContext* c) {
    return stub_->VerifyDrafts(c, request, response);
  });
}

absl::Status Client::CommitDrafts(const v1::CommitDraftsRequest& request, const CallOptions& call) {
  v1::CommitDraftsResponse response;
  return WithRetries(call, absl::StatusCode::kOk, [&](grpc::ClientContext* c) {
    return stub_->CommitDrafts(c, request, &response);
  });
}

absl::Status Client::Flush(absl::Span<const uint64_t> ids, const CallOptions& call) {
  v1::FlushRequest request;
  request.mutable_ids()->Assign(ids.begin(), ids.end());
  v1::FlushResponse response;
  return WithRetries(call, absl::StatusCode::kOk,
                     [&](grpc::ClientContext* c) { return stub_->Flush(c, request, &response); });
}

absl::StatusOr<ServingStatus> Client::CheckHealth(const std::string& service,
                                                  absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineAfter(timeout));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  absl::Status s = FromGrpcStatus(health_->Check(&context, request, &response));
  if (!s.ok()) return s;
  return response.status();
}

absl::Status Client::WaitUntilReady(absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  absl::Status last = absl::UnavailableError("not checked");
  while (absl::Now() < until) {
    absl::StatusOr<ServingStatus> s = CheckHealth("readiness", absl::Seconds(1));
    if (s.ok() && *s == grpc::health::v1::HealthCheckResponse::SERVING) return absl::OkStatus();
    last =
        s.ok()
            ? absl::UnavailableError(absl::StrCat(
                  "readiness is ", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*s)))
            : s.status();
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::UnavailableError(
      absl::StrCat("server not ready after ", absl::FormatDuration(timeout), ": ", last.message()));
}

std::unique_ptr<StreamSession> Client::OpenStream(absl::Duration timeout) {
  return std::make_unique<StreamSession>(stub_.get(), timeout, options_.bearer_token);
}

}  // namespace kvbuffer::client
