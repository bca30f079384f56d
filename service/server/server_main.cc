// kvbuffer-server: the AttentionService on a CPU or CUDA engine. Prints "listening on HOST:PORT"
// on stdout once it serves; on SIGTERM or SIGINT it drains (readiness NOT_SERVING, no new
// sequences), stops accepting calls, lets in-flight calls finish, folds the buffers of every open
// sequence into its state (those with uncommitted drafts are left and reported) and exits 0.
#include <signal.h>
#include <time.h>

#include <cstdio>
#include <memory>
#include <string>
#include <utility>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "service/engine/engine.h"
#include "service/server/backend_factory.h"
#include "service/server/drain.h"
#include "service/server/kvbuffer_server.h"
#include "service/server/log_flags.h"
#include "service/server/server_flags.h"

#ifndef KVB_VERSION
#define KVB_VERSION "0.0.0"
#endif

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "kvbuffer-server: %s\n", s.ToString().c_str());
  return 2;
}

// Waits up to `d` for a signal in `set`; returns it, or 0 on timeout.
int WaitForSignal(const sigset_t& set, absl::Duration d) {
  const timespec ts = absl::ToTimespec(d);
  const int sig = sigtimedwait(&set, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Serves Gated DeltaNet linear attention (kvbuffer.v1.AttentionService) over gRPC.\n"
      "Example: kvbuffer-server --model=small --backend=cpu --port=0");
  absl::ParseCommandLine(argc, argv);

  // Every thread started from here on inherits the mask; the signals are taken by sigwait below.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<kvbuffer::server::ServerConfig> config = kvbuffer::server::ServerConfigFromFlags();
  if (!config.ok()) return Fail(config.status());
  // Structured logs (log_flags.h): startup and shutdown events here, every call in the server.
  absl::StatusOr<std::shared_ptr<kvbuffer::server::LogWriter>> log =
      kvbuffer::server::LogWriterFromFlags();
  if (!log.ok()) return Fail(log.status());
  config->server.request_log = std::make_shared<kvbuffer::server::RequestLog>(*log);
  // A tensor-parallel group that breaks turns every health name NOT_SERVING (declared before the
  // backend: the group may report while it is torn down).
  kvbuffer::server::BrokenGroupRelay broken_group;
  absl::StatusOr<kvbuffer::server::ServingBackend> backend = kvbuffer::server::MakeServingBackend(
      config->backend, config->engine,
      [&broken_group](const absl::Status& why) { broken_group.Report(why); });
  if (!backend.ok()) return Fail(backend.status());
  const std::string backend_name = backend->backend->Name();
  const int32_t tensor_parallel = backend->tensor_parallel_size;
  // Rank 0's bootstrap (mode processes) lives until main returns, after the engine.
  std::shared_ptr<void> keep_alive = std::move(backend->keep_alive);
  absl::StatusOr<std::unique_ptr<kvbuffer::Engine>> engine =
      kvbuffer::Engine::Create(config->engine, std::move(backend->backend));
  if (!engine.ok()) return Fail(engine.status());

  // Linking grpc++_reflection registers the plugin for every server of the process; the API port
  // keeps it only where ReflectionServed allows, the health port never.
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  kvbuffer::server::ServerOptions& options = config->server;
  options.identity.version = KVB_VERSION;
  options.identity.features = {"prefill", "decode_step", "verify_drafts", "commit_drafts",
                               "flush",   "stream",      "exact_replay",  "stateless_sequences",
                               "health"};
  if (kvbuffer::server::ReflectionServed(options)) {
    options.identity.features.push_back("reflection");
  }
  if (options.tls.tls()) {
    options.identity.features.push_back(options.tls.client_ca_file.empty() ? "tls" : "mutual_tls");
  }
  if (options.auth.tokens != nullptr) options.identity.features.push_back("bearer_auth");
  options.identity.tensor_parallel_size = tensor_parallel;
  if (tensor_parallel > 1) options.identity.features.push_back("tensor_parallel");
  if (options.auth.tenant_from_client_cert) {
    options.identity.features.push_back("client_cert_tenants");
  }
  absl::StatusOr<std::unique_ptr<kvbuffer::server::KvbufferServer>> server =
      kvbuffer::server::KvbufferServer::Start(options, std::move(*engine));
  if (!server.ok()) return Fail(server.status());
  broken_group.Attach([raw = server->get()](const absl::Status& why) { raw->MarkUnhealthy(why); });

  const kvbuffer::ModelConfig& model = config->engine.model;
  std::fprintf(stderr,
               "kvbuffer-server %s: backend %s, model %s (L=%d H=%d HV=%d K=%d V=%d W=%d), "
               "flush_interval %d, stateless_limit %d, max_message_bytes %lld\n",
               KVB_VERSION, backend_name.c_str(), model.name.c_str(), model.num_layers,
               model.num_k_heads, model.num_v_heads, model.head_k_dim, model.head_v_dim,
               model.conv_width, config->engine.flush_interval, config->engine.stateless_limit,
               static_cast<long long>(options.max_message_bytes));
  if (tensor_parallel > 1) {
    std::fprintf(stderr, "kvbuffer-server: tensor parallel %d (%s): %s\n", tensor_parallel,
                 config->backend.tp.mode.c_str(), backend->layout.c_str());
  }
  if (options.auth.tokens != nullptr && !options.tls.tls()) {
    std::fprintf(stderr,
                 "kvbuffer-server: WARNING: bearer tokens on a plaintext port travel unencrypted; "
                 "use --tls_cert/--tls_key outside loopback\n");
  }
  std::fprintf(stderr, "kvbuffer-server: API port %s, authentication %s\n",
               options.tls.require_client_cert ? "mutual TLS"
               : options.tls.tls()             ? "TLS"
                                               : "plaintext",
               options.auth.tokens != nullptr && options.auth.tenant_from_client_cert
                   ? "bearer tokens or client certificates"
               : options.auth.tokens != nullptr       ? "bearer tokens"
               : options.auth.tenant_from_client_cert ? "client certificates"
                                                      : "off (every caller is tenant \"\")");
  (*log)->Log(kvbuffer::server::LogLevel::kInfo, "server_started",
              {{"version", KVB_VERSION},
               {"backend", backend_name},
               {"model", model.name},
               {"host", options.host},
               {"port", (*server)->port()},
               {"health_port", (*server)->health_port()},
               {"metrics_port", (*server)->metrics_port()},
               {"tls", options.tls.tls()},
               {"bearer_auth", options.auth.tokens != nullptr},
               {"tensor_parallel", tensor_parallel}});
  std::printf("listening on %s:%d\n", options.host.c_str(), (*server)->port());
  if ((*server)->health_port() >= 0) {
    const std::string& hhost = options.health_host.empty() ? options.host : options.health_host;
    std::printf("health on %s:%d\n", hhost.c_str(), (*server)->health_port());
  }
  if ((*server)->metrics_port() >= 0) {
    const std::string& mhost = options.metrics_host.empty() ? options.host : options.metrics_host;
    std::printf("metrics on http://%s:%d/metrics\n", mhost.c_str(), (*server)->metrics_port());
  }
  std::fflush(stdout);

  int sig = 0;
  while (sig == 0) sig = WaitForSignal(signals, absl::Hours(1));
  std::fprintf(stderr, "kvbuffer-server: %s: draining (readiness NOT_SERVING)\n",
               sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*log)->Log(kvbuffer::server::LogLevel::kInfo, "server_draining",
              {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
  (*server)->BeginDrain();
  if (config->drain_grace > absl::ZeroDuration()) {
    // A second signal cuts the grace period short.
    WaitForSignal(signals, config->drain_grace);
  }
  std::fprintf(stderr, "kvbuffer-server: closing the listener; in-flight calls get %s\n",
               absl::FormatDuration(config->shutdown_timeout).c_str());
  (*server)->Shutdown(config->shutdown_timeout);
  std::fprintf(stderr, "kvbuffer-server: %s\n",
               kvbuffer::server::FormatDrainReport((*server)->drain_report()).c_str());
  {
    const kvbuffer::server::DrainReport report = (*server)->drain_report();
    (*log)->Log(kvbuffer::server::LogLevel::kInfo, "server_shutdown",
                {{"open_sequences", report.open},
                 {"flushed", report.flushed},
                 {"clean", report.clean},
                 {"pending_drafts", static_cast<int64_t>(report.pending_drafts.size())},
                 {"flush_failed", static_cast<int64_t>(report.failed.size())}});
  }
  broken_group.Attach(nullptr);
  server->reset();
  std::fprintf(stderr, "kvbuffer-server: stopped\n");
  (*log)->Log(kvbuffer::server::LogLevel::kInfo, "server_stopped", {});
  return 0;
}
