// Who a call acts for: the tenant whose namespace holds the sequence ids it names. With
// authentication off every call is tenant "". With bearer tokens on, the tenant of the call's
// token; with tenant_from_client_cert, the identity of a verified client certificate (its first
// subject alternative name, else its common name). Tenants from both sources share one namespace.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/server_context.h"
#include "service/server/bearer_auth.h"

namespace kvbuffer::server {

struct AuthOptions {
  std::shared_ptr<const TokenTable> tokens;  // null: bearer tokens are not used
  bool tenant_from_client_cert = false;      // a verified client certificate names a tenant
};

class TenantResolver {
 public:
  // A resolver applying `options`.
  explicit TenantResolver(AuthOptions options = {});

  // Whether calls must identify themselves (tokens or client certificates are on).
  bool enabled() const { return options_.tokens != nullptr || options_.tenant_from_client_cert; }

  // The tenant the call of `context` acts for: "" when authentication is off; else the tenant of
  // its bearer token, or else of its verified client certificate. UNAUTHENTICATED (naming what is
  // missing, never echoing a token) when a token is sent but unknown or malformed, or when neither
  // identifies the caller. Call it once per call, on the thread that started the call.
  absl::StatusOr<std::string> Resolve(const grpc::ServerContextBase& context) const;

 private:
  AuthOptions options_;
};

}  // namespace kvbuffer::server
