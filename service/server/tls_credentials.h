// The credentials of the API port: plaintext, TLS, or mutual TLS, from PEM files named by the
// --tls_cert, --tls_key, --tls_client_ca and --require_client_cert flags.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/server_credentials.h"

namespace kvbuffer::server {

struct TlsServerFiles {
  std::string cert_file;             // PEM certificate chain of the server; empty: plaintext
  std::string key_file;              // PEM private key of that certificate
  std::string client_ca_file;        // PEM CA bundle client certificates are verified against
  bool require_client_cert = false;  // refuse connections without a verified client certificate

  bool tls() const { return !cert_file.empty(); }
};

// OK when the combination makes sense: cert and key together; a client CA or a required client
// certificate only with TLS; a required client certificate only with a client CA. Otherwise
// INVALID_ARGUMENT naming the flags.
absl::Status ValidateTlsServerFiles(const TlsServerFiles& files);

// Plaintext credentials when `files` has no certificate; else TLS with its certificate and key,
// client certificates requested and verified against client_ca_file when given (and required with
// require_client_cert). INVALID_ARGUMENT for a bad combination, NOT_FOUND for an unreadable file,
// INVALID_ARGUMENT for a file that holds no PEM block.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsServerFiles& files);

// The contents of PEM file `path` (named as `flag` in errors): NOT_FOUND when unreadable,
// INVALID_ARGUMENT when it holds no "-----BEGIN" block.
absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path);

}  // namespace kvbuffer::server
