// How the C++ client proves who it is and checks whom it talks to: TLS (server certificate
// verified against a CA), mutual TLS (a client certificate), and a bearer token sent as
// `authorization: Bearer <token>` metadata on every call.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"

namespace kvbuffer::client {

struct TlsOptions {
  bool enabled = false;         // false: plaintext
  std::string root_certs_pem;   // CA(s) the server certificate must chain to; empty: system roots
  std::string cert_chain_pem;   // client certificate (mutual TLS); empty: none
  std::string private_key_pem;  // its private key
  std::string server_name;      // name checked against the server certificate; empty: the host
};

// TLS options from PEM files (any path may be empty: not used); NOT_FOUND naming an unreadable
// file. `enabled` is set.
absl::StatusOr<TlsOptions> TlsOptionsFromFiles(const std::string& ca_file,
                                               const std::string& cert_file,
                                               const std::string& key_file,
                                               const std::string& server_name = "");

// Channel credentials for `tls`: SSL credentials when enabled, else insecure.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(const TlsOptions& tls);

// Adds `authorization: Bearer <token>` to `context` when `token` is not empty.
void AddBearerToken(const std::string& token, grpc::ClientContext* context);

}  // namespace kvbuffer::client
