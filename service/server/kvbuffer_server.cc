#include "service/server/kvbuffer_server.h"

#include <chrono>
#include <climits>
#include <cstdio>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "service/server/builder_plugins.h"
#include "service/server/health_names.h"
#include "service/server/metrics/engine_gauges.h"

namespace kvbuffer::server {

namespace {

// "host:port" with IPv6 literals bracketed.
std::string HostPort(const std::string& host, int port) {
  if (absl::StrContains(host, ':') && !absl::StartsWith(host, "[")) {
    return absl::StrCat("[", host, "]:", port);
  }
  return absl::StrCat(host, ":", port);
}

}  // namespace

bool ReflectionServed(const ServerOptions& options) {
  const bool per_call_auth = options.auth.tokens != nullptr || options.auth.tenant_from_client_cert;
  return options.reflection && (!per_call_auth || options.tls.require_client_cert);
}

KvbufferServer::KvbufferServer(ServerOptions options, std::unique_ptr<Engine> engine,
                               std::unique_ptr<Executor> executor)
    : options_(std::move(options)), engine_(std::move(engine)), executor_(std::move(executor)) {}

absl::StatusOr<std::unique_ptr<KvbufferServer>> KvbufferServer::Start(
    ServerOptions options, std::unique_ptr<Engine> engine, std::unique_ptr<Executor> executor) {
  if (options.max_message_bytes < 1 || options.max_message_bytes > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("max_message_bytes must be in [1, ", INT_MAX,
                                                   "], got ", options.max_message_bytes));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(options.tls);
  if (!credentials.ok()) return credentials.status();
  if (!executor) executor = std::make_unique<Executor>(options.executor_threads);
  options.identity.max_message_bytes = options.max_message_bytes;
  std::unique_ptr<KvbufferServer> s(
      new KvbufferServer(std::move(options), std::move(engine), std::move(executor)));
  s->metrics_ = std::make_unique<metrics::ServiceMetrics>(&s->registry_);
  Engine* engine_ptr = s->engine_.get();
  s->metrics_->SetBuildInfo(s->options_.identity.version, engine_ptr->Info().backend,
                            engine_ptr->options().model.name);
  s->metrics_->CollectFrom(
      [engine_ptr] { return metrics::EngineGaugesFromInfo(engine_ptr->Info()); });
  s->handler_ = std::make_unique<RequestHandler>(s->engine_.get(), s->options_.identity);
  s->tenants_ = std::make_unique<TenantResolver>(s->options_.auth);
  s->service_ = std::make_unique<AttentionServiceImpl>(
      s->handler_.get(), s->executor_.get(), s->options_.stream_window, s->tenants_.get(),
      s->metrics_.get(), s->options_.request_log.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  const std::string address = HostPort(s->options_.host, s->options_.port);
  builder.AddListeningPort(address, *credentials, &s->port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(s->options_.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(s->options_.max_message_bytes));
  builder.RegisterService(s->service_.get());
  if (!ReflectionServed(s->options_)) builder.SetOption(WithoutPlugins({kReflectionPlugin}));
  s->server_ = builder.BuildAndStart();
  if (!s->server_ || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("could not listen on ", address));
  }
  s->server_->GetHealthCheckService()->SetServingStatus(true);  // "" and every name
  if (s->options_.health_port >= 0) {
    const std::string host =
        s->options_.health_host.empty() ? s->options_.host : s->options_.health_host;
    absl::StatusOr<std::unique_ptr<HealthEndpoint>> health =
        HealthEndpoint::Start(host, s->options_.health_port);
    if (!health.ok()) return health.status();
    s->health_ = *std::move(health);
  }
  for (const char* name : {kLivenessService, kReadinessService, kAttentionService}) {
    s->SetHealth(name, true);
  }
  if (s->options_.metrics_port >= 0) {
    s->metrics_http_ = std::make_unique<metrics::MetricsHttpServer>(&s->registry_);
    const std::string host =
        s->options_.metrics_host.empty() ? s->options_.host : s->options_.metrics_host;
    std::string error;
    if (!s->metrics_http_->Start(host, s->options_.metrics_port, &error)) {
      return absl::UnavailableError(absl::StrCat(
          "metrics endpoint on ", HostPort(host, s->options_.metrics_port), ": ", error));
    }
  }
  s->reclaimer_ = std::thread([raw = s.get()] { raw->ReclaimLoop(); });
  return s;
}

KvbufferServer::~KvbufferServer() { Shutdown(absl::ZeroDuration()); }

std::string KvbufferServer::dial_address() const {
  const std::string& h = options_.host;
  const bool wildcard = h.empty() || h == "0.0.0.0" || h == "::" || h == "[::]";
  return HostPort(wildcard ? "127.0.0.1" : h, port_);
}

void KvbufferServer::SetHealth(const char* service, bool serving) {
  server_->GetHealthCheckService()->SetServingStatus(service, serving);
  if (health_) health_->SetServing(service, serving);
}

void KvbufferServer::BeginDrain() {
  handler_->StartDraining();
  SetHealth(kReadinessService, false);
  SetHealth(kAttentionService, false);
}

void KvbufferServer::MarkUnhealthy(const absl::Status& why) {
  std::fprintf(stderr, "kvbuffer-server: backend broken, health NOT_SERVING: %s\n",
               why.ToString().c_str());
  server_->GetHealthCheckService()->SetServingStatus(false);  // "" and every name
  if (health_) health_->SetServing("", false);
}

DrainReport KvbufferServer::drain_report() {
  absl::MutexLock lock(&shutdown_mu_);
  return drain_report_;
}

void KvbufferServer::Shutdown(absl::Duration timeout) {
  absl::MutexLock lock(&shutdown_mu_);
  if (shut_down_ || !server_) return;
  shut_down_ = true;
  BeginDrain();
  // Stops accepting calls, waits for in-flight ones until the deadline, then cancels the rest;
  // returns once every call has finished (their executor jobs answer cancelled calls at once).
  server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
  stop_reclaimer_.Notify();
  if (reclaimer_.joinable()) reclaimer_.join();
  executor_.reset();  // runs whatever is still queued, then joins
  // No call can reach the engine any more: fold what the sequences have buffered.
  if (options_.flush_on_shutdown) drain_report_ = FlushOpenSequences(engine_.get());
  if (metrics_http_) metrics_http_->Stop();
  if (health_) health_->Shutdown();
}

void KvbufferServer::ReclaimLoop() {
  while (!stop_reclaimer_.WaitForNotificationWithTimeout(options_.reclaim_interval)) {
    const int32_t closed = engine_->ReclaimIdle(absl::Now());
    if (closed > 0) {
      std::fprintf(stderr, "kvbuffer-server: closed %d idle sequence(s)\n", closed);
    }
  }
}

}  // namespace kvbuffer::server
