#include "client/cpp/client_credentials.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace kvbuffer::client {

namespace {

absl::Status ReadFile(const std::string& path, std::string* out) {
  if (path.empty()) return absl::OkStatus();
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  *out = text.str();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TlsOptions> TlsOptionsFromFiles(const std::string& ca_file,
                                               const std::string& cert_file,
                                               const std::string& key_file,
                                               const std::string& server_name) {
  TlsOptions tls;
  tls.enabled = true;
  tls.server_name = server_name;
  if (cert_file.empty() != key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key, and a key its "
        "certificate");
  }
  if (absl::Status s = ReadFile(ca_file, &tls.root_certs_pem); !s.ok()) return s;
  if (absl::Status s = ReadFile(cert_file, &tls.cert_chain_pem); !s.ok()) return s;
  if (absl::Status s = ReadFile(key_file, &tls.private_key_pem); !s.ok()) return s;
  return tls;
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(const TlsOptions& tls) {
  if (!tls.enabled) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = tls.root_certs_pem;
  options.pem_cert_chain = tls.cert_chain_pem;
  options.pem_private_key = tls.private_key_pem;
  return grpc::SslCredentials(options);
}

void AddBearerToken(const std::string& token, grpc::ClientContext* context) {
  if (!token.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
}

}  // namespace kvbuffer::client
