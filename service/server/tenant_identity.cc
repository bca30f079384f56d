#include "service/server/tenant_identity.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/security/auth_context.h"

namespace kvbuffer::server {

namespace {

constexpr char kAuthorization[] = "authorization";

absl::Status Unauthenticated(absl::string_view why) {
  return absl::UnauthenticatedError(
      absl::StrCat(why,
                   "; send metadata \"authorization: Bearer <token>\" with a token of the server's "
                   "--auth_tokens_file"));
}

}  // namespace

TenantResolver::TenantResolver(AuthOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::string> TenantResolver::Resolve(const grpc::ServerContextBase& context) const {
  if (!enabled()) return std::string();
  if (options_.tokens != nullptr) {
    const auto& metadata = context.client_metadata();
    const auto range = metadata.equal_range(kAuthorization);
    int count = 0;
    absl::string_view value;
    for (auto it = range.first; it != range.second; ++it, ++count) {
      value = absl::string_view(it->second.data(), it->second.size());
    }
    if (count > 1) {
      return absl::UnauthenticatedError("more than one authorization metadata entry; send one");
    }
    if (count == 1) {
      std::optional<absl::string_view> token = BearerTokenOf(value);
      if (!token.has_value()) {
        return Unauthenticated("the authorization metadata is not of the form \"Bearer <token>\"");
      }
      std::optional<std::string> tenant = options_.tokens->TenantOf(*token);
      if (!tenant.has_value()) return Unauthenticated("the bearer token is not valid");
      return *std::move(tenant);
    }
  }
  if (options_.tenant_from_client_cert) {
    std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
    if (auth != nullptr && auth->IsPeerAuthenticated()) {
      const std::vector<grpc::string_ref> identity = auth->GetPeerIdentity();
      if (!identity.empty() && identity.front().size() > 0) {
        return std::string(identity.front().data(), identity.front().size());
      }
    }
    if (options_.tokens == nullptr) {
      return absl::UnauthenticatedError(
          "no verified client certificate; this server takes the tenant from the client "
          "certificate (mutual TLS)");
    }
    return Unauthenticated("no bearer token and no verified client certificate");
  }
  return Unauthenticated("no authorization metadata");
}

}  // namespace kvbuffer::server
