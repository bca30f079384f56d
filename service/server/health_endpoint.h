// A plaintext gRPC port that serves grpc.health.v1.Health only, for probes (kubelet gRPC probes
// speak neither TLS nor bearer tokens) while the API port needs TLS or tokens. It exposes no
// AttentionService method.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/server.h"

namespace kvbuffer::server {

class HealthEndpoint {
 public:
  // Listens on host:port (0 picks a free port) with plaintext credentials; every health name
  // starts SERVING. UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<HealthEndpoint>> Start(const std::string& host, int port);

  // Shuts down at once.
  ~HealthEndpoint();

  // Sets the status answered for `service` ("" and every name when `service` is empty).
  void SetServing(const std::string& service, bool serving);

  // The port actually bound.
  int port() const { return port_; }

  // Stops answering (probes then fail to connect). Idempotent.
  void Shutdown();

 private:
  HealthEndpoint() = default;

  // Answers every method but health UNIMPLEMENTED. It also gives the server the polled callback
  // queue it needs once no plugin (reflection) brings sync methods.
  grpc::CallbackGenericService unimplemented_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace kvbuffer::server
