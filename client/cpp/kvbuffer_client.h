// C++ client of kvbuffer.v1.AttentionService: a typed call for every RPC with per-call deadlines
// and safe retries, health checks, and Stream sessions (stream_session.h).
//
// Retries: a call that fails with UNAVAILABLE or DEADLINE_EXCEEDED is sent again unchanged, with
// backoff. That is safe because per-layer calls carry each sequence's position: a call the server
// had applied already is answered from its replay record (LayerOutput.replayed) and never applied
// twice. OpenSequences treats ALREADY_EXISTS on a retry as success (the first attempt opened
// them), CloseSequences NOT_FOUND on a retry likewise; CommitDrafts and Flush are idempotent.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/cpp/client_credentials.h"
#include "client/cpp/stream_session.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/support/channel_arguments.h"
#include "kvbuffer/v1/attention_service.grpc.pb.h"

namespace kvbuffer::client {

struct ClientOptions {
  absl::Duration timeout = absl::Seconds(60);  // per attempt, unless a call says otherwise
  int max_attempts = 4;                        // first attempt included
  absl::Duration initial_backoff = absl::Milliseconds(20);
  absl::Duration max_backoff = absl::Seconds(1);
  int max_message_bytes = -1;  // client-side limit on both directions; -1 = none (the server's
                               // --max_message_bytes decides)
  TlsOptions tls;              // plaintext unless tls.enabled (client_credentials.h)
  std::string bearer_token;    // sent as "authorization: Bearer <token>" on every API call
};

// Overrides for one call.
struct CallOptions {
  absl::Duration timeout = absl::ZeroDuration();  // zero: ClientOptions::timeout
  int max_attempts = 0;                           // zero: ClientOptions::max_attempts
  int* attempts = nullptr;                        // receives the number of attempts made
};

// Health of a named service as grpc.health.v1 reports it.
using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

class Client {
 public:
  // A client on a channel to `target` ("host:port"): plaintext or TLS per options.tls, with the
  // options' message limits; options.bearer_token goes with every API call.
  static std::unique_ptr<Client> Connect(const std::string& target, ClientOptions options = {});

  // Channel arguments Connect uses (for callers building their own channel, e.g. with
  // interceptors): message limits and the TLS server name override.
  static grpc::ChannelArguments ChannelArgumentsFor(const ClientOptions& options);

  // A client on an existing channel (options.tls is not used; the channel has its credentials).
  explicit Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options = {});

  // Model shapes, settings, capacity, counters.
  absl::StatusOr<v1::GetServerInfoResponse> GetServerInfo(
      const v1::GetServerInfoRequest& request = {}, const CallOptions& call = {});

  // Opens sequences with these ids (all or none).
  absl::Status OpenSequences(absl::Span<const uint64_t> ids, const CallOptions& call = {});

  // Closes sequences (all or none).
  absl::Status CloseSequences(absl::Span<const uint64_t> ids, const CallOptions& call = {});

  // Per-layer calls; `response` receives the outputs (its storage is reused).
  absl::Status Prefill(const v1::PrefillRequest& request, v1::LayerOutput* response,
                       const CallOptions& call = {});
  absl::Status DecodeStep(const v1::DecodeStepRequest& request, v1::LayerOutput* response,
                          const CallOptions& call = {});
  absl::Status VerifyDrafts(const v1::VerifyDraftsRequest& request, v1::LayerOutput* response,
                            const CallOptions& call = {});

  // Keeps accepted draft prefixes on every layer.
  absl::Status CommitDrafts(const v1::CommitDraftsRequest& request, const CallOptions& call = {});

  // Folds these sequences' buffers into their states now.
  absl::Status Flush(absl::Span<const uint64_t> ids, const CallOptions& call = {});

  // grpc.health.v1 Check of `service` ("liveness", "readiness", ...); no retries, no token.
  absl::StatusOr<ServingStatus> CheckHealth(const std::string& service,
                                            absl::Duration timeout = absl::Seconds(5));

  // Polls readiness until SERVING or `timeout` passes (UNAVAILABLE then).
  absl::Status WaitUntilReady(absl::Duration timeout);

  // Opens a Stream whose whole life is bounded by `timeout`.
  std::unique_ptr<StreamSession> OpenStream(absl::Duration timeout = absl::Hours(24));

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  v1::AttentionService::Stub* stub() { return stub_.get(); }

 private:
  // Runs `attempt(context)` with a fresh deadline per attempt, retrying retryable failures;
  // `ok_on_retry` is a code that counts as success when seen on a retry.
  template <typename Attempt>
  absl::Status WithRetries(const CallOptions& call, absl::StatusCode ok_on_retry, Attempt attempt);

  std::shared_ptr<grpc::Channel> channel_;
  ClientOptions options_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

}  // namespace kvbuffer::client
