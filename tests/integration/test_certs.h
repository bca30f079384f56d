// Certificates for the TLS tests, made by the openssl command line in a fresh directory: a CA,
// a server certificate for 127.0.0.1 and localhost signed by it, client certificates for two
// tenants signed by it, and a client certificate signed by an unrelated CA.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace kvbuffer::testing {

struct TestCerts {
  std::string dir;
  std::string ca_pem;       // the CA that signs everything below (file ca.pem)
  std::string server_cert;  // paths, for server flags
  std::string server_key;
  std::string ca_file;
  // PEM contents, for client options.
  std::string client_a_cert, client_a_key;  // CN=tenant-a
  std::string client_b_cert, client_b_key;  // CN=tenant-b
  std::string rogue_cert, rogue_key;        // CN=tenant-a, signed by another CA
};

// Makes the certificates under a new directory of ::testing::TempDir() (EC P-256, valid for a
// day); an error naming the openssl step that failed.
absl::StatusOr<TestCerts> MakeTestCerts();

}  // namespace kvbuffer::testing
