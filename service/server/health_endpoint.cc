#include "service/server/health_endpoint.h"

#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "service/server/builder_plugins.h"

namespace kvbuffer::server {

absl::StatusOr<std::unique_ptr<HealthEndpoint>> HealthEndpoint::Start(const std::string& host,
                                                                      int port) {
  std::unique_ptr<HealthEndpoint> e(new HealthEndpoint());
  const std::string address = absl::StrContains(host, ':') && !absl::StartsWith(host, "[")
                                  ? absl::StrCat("[", host, "]:", port)
                                  : absl::StrCat(host, ":", port);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &e->port_);
  builder.SetMaxReceiveMessageSize(4096);  // health requests are a service name
  builder.SetOption(WithoutPlugins());     // no reflection (nor any other plugin service)
  builder.RegisterCallbackGenericService(&e->unimplemented_);
  e->server_ = builder.BuildAndStart();
  if (!e->server_ || e->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("health endpoint: could not listen on ", address));
  }
  e->server_->GetHealthCheckService()->SetServingStatus(true);
  return e;
}

HealthEndpoint::~HealthEndpoint() { Shutdown(); }

void HealthEndpoint::SetServing(const std::string& service, bool serving) {
  if (!server_) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (service.empty()) {
    health->SetServingStatus(serving);
  } else {
    health->SetServingStatus(service, serving);
  }
}

void HealthEndpoint::Shutdown() {
  if (!server_) return;
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
  server_.reset();
}

}  // namespace kvbuffer::server
