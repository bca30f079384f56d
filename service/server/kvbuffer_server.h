// The gRPC server around an engine: listening port (plaintext, TLS or mutual TLS) and message
// limits, the AttentionService with its callers' tenants (bearer tokens or client certificates),
// the standard health service (liveness and readiness names, see health_names.h; optionally also
// on a plaintext health-only port), the idle reclaimer, and draining and graceful shutdown with
// the drain flush. Server reflection is a process-wide plugin (present when the binary links
// grpc++_reflection, as kvbuffer-server does); ReflectionServed says when the API port keeps it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "service/engine/engine.h"
#include "service/server/attention_service_impl.h"
#include "service/server/drain.h"
#include "service/server/executor.h"
#include "service/server/health_endpoint.h"
#include "service/server/metrics/http_server.h"
#include "service/server/metrics/service_metrics.h"
#include "service/server/request_handler.h"
#include "service/server/request_log.h"
#include "service/server/tenant_identity.h"
#include "service/server/tls_credentials.h"

namespace kvbuffer::server {

struct ServerOptions {
  std::string host = "0.0.0.0";
  int port = 50051;  // 0: pick a free one (see KvbufferServer::port)
  // Largest message received or sent; gRPC answers RESOURCE_EXHAUSTED beyond it.
  int64_t max_message_bytes = int64_t{256} << 20;
  int executor_threads = 4;
  int stream_window = 64;  // requests a Stream reads ahead of its answers
  absl::Duration reclaim_interval = absl::Seconds(5);  // how often idle sequences are reclaimed
  int metrics_port = -1;     // Prometheus GET /metrics on this port; 0 picks one; -1 none
  std::string metrics_host;  // empty: the same as host
  ServerIdentity identity;   // version, features, parameter source (max_message_bytes is set here)
  TlsServerFiles tls;        // no certificate: plaintext
  AuthOptions auth;          // no tokens and no client-certificate tenants: everyone is tenant ""
  int health_port = -1;      // a plaintext port serving only grpc.health.v1; 0 picks one; -1 none
  std::string health_host;   // empty: the same as host
  bool flush_on_shutdown = true;                  // Shutdown ends with the drain flush (drain.h)
  std::shared_ptr<const RequestLog> request_log;  // null: calls are not logged (request_log.h)
  bool reflection = true;  // keep server reflection (if linked) where ReflectionServed allows it
};

// Whether the API port serves grpc.reflection: only when `options.reflection` is on and no call
// needs credentials the reflection service cannot check, i.e. authentication is off, or every
// connection proved itself in the TLS handshake (--require_client_cert). With bearer tokens (or
// client-certificate tenants without required certificates) reflection is off: gRPC's reflection
// plugin runs outside our per-call authentication, so it would answer anyone. The health port
// never serves it.
bool ReflectionServed(const ServerOptions& options);

class KvbufferServer {
 public:
  // Builds and starts the server on `engine`; engine work runs on `executor` (a new one of
  // options.executor_threads threads when null). UNAVAILABLE if the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<KvbufferServer>> Start(
      ServerOptions options, std::unique_ptr<Engine> engine,
      std::unique_ptr<Executor> executor = nullptr);

  // Shuts down at once (cancelling in-flight calls) unless Shutdown ran already.
  ~KvbufferServer();

  KvbufferServer(const KvbufferServer&) = delete;
  KvbufferServer& operator=(const KvbufferServer&) = delete;

  // The port actually bound.
  int port() const { return port_; }
  // "host:port" a local client can dial (127.0.0.1 for a wildcard host).
  std::string dial_address() const;

  Engine* engine() const { return engine_.get(); }

  // The port of the plaintext health-only endpoint, or -1 when there is none.
  int health_port() const { return health_ ? health_->port() : -1; }

  // The port of GET /metrics, or -1 when metrics are not served over HTTP.
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : -1; }
  // The server's metrics (also rendered by GET /metrics).
  metrics::Registry* metrics_registry() { return &registry_; }

  // Readiness goes NOT_SERVING and OpenSequences answers UNAVAILABLE; everything else is served.
  void BeginDrain();

  // Every health name, liveness and "" included, goes NOT_SERVING for good (the backend is
  // broken, e.g. a tensor-parallel rank died: restart the process); safe from any thread.
  void MarkUnhealthy(const absl::Status& why);

  // BeginDrain, stop accepting calls, let in-flight calls finish for up to `timeout` and cancel
  // the rest, stop the reclaimer and the executor, then flush every open sequence's buffers
  // (unless options.flush_on_shutdown is off) and stop the health endpoint. Idempotent; blocks
  // until done.
  void Shutdown(absl::Duration timeout);

  // What the drain flush of Shutdown did (empty before Shutdown).
  DrainReport drain_report();

 private:
  KvbufferServer(ServerOptions options, std::unique_ptr<Engine> engine,
                 std::unique_ptr<Executor> executor);
  void ReclaimLoop();
  // Sets the health status of `service` on the API port and the health endpoint.
  void SetHealth(const char* service, bool serving);

  ServerOptions options_;
  std::unique_ptr<Engine> engine_;
  metrics::Registry registry_;
  std::unique_ptr<metrics::ServiceMetrics> metrics_;
  std::unique_ptr<metrics::MetricsHttpServer> metrics_http_;
  std::unique_ptr<RequestHandler> handler_;
  std::unique_ptr<TenantResolver> tenants_;
  std::unique_ptr<HealthEndpoint> health_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<AttentionServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  absl::Notification stop_reclaimer_;
  std::thread reclaimer_;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  DrainReport drain_report_ ABSL_GUARDED_BY(shutdown_mu_);
};

}  // namespace kvbuffer::server
