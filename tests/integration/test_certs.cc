#include "tests/integration/test_certs.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"

namespace kvbuffer::testing {

namespace {

absl::Status Openssl(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"/usr/bin/openssl"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::string out;
  absl::StatusOr<int> code = RunProgram(argv, &out, absl::Seconds(30));
  if (!code.ok()) return code.status();
  if (*code != 0) {
    return absl::InternalError(absl::StrCat(
        "openssl ", args[0], " ", args.size() > 1 ? args[1] : "", " exited ", *code, ": ", out));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Slurp(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::Status Write(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  return out ? absl::OkStatus() : absl::InternalError(absl::StrCat("cannot write ", path));
}

// A self-signed CA `name` in dir/name.pem, dir/name.key.
absl::Status MakeCa(const std::string& dir, const std::string& name) {
  return Openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", dir + "/" + name + ".key", "-out", dir + "/" + name + ".pem",
                  "-days", "1", "-subj", "/CN=" + name, "-addext",
                  "basicConstraints=critical,CA:TRUE", "-addext",
                  "keyUsage=critical,keyCertSign,cRLSign"});
}

// A leaf `name` with `cn`, signed by CA `ca`, with extensions `ext` (an openssl extfile body).
absl::Status MakeLeaf(const std::string& dir, const std::string& ca, const std::string& name,
                      const std::string& cn, const std::string& ext) {
  const std::string base = dir + "/" + name;
  if (absl::Status s =
          Openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-keyout", base + ".key", "-out", base + ".csr", "-subj", "/CN=" + cn});
      !s.ok()) {
    return s;
  }
  if (absl::Status s = Write(base + ".ext", ext); !s.ok()) return s;
  return Openssl({"x509", "-req", "-in", base + ".csr", "-CA", dir + "/" + ca + ".pem", "-CAkey",
                  dir + "/" + ca + ".key", "-CAcreateserial", "-out", base + ".pem", "-days", "1",
                  "-extfile", base + ".ext"});
}

}  // namespace

absl::StatusOr<TestCerts> MakeTestCerts() {
  TestCerts c;
  c.dir = absl::StrCat(::testing::TempDir(), "/kvb-certs-", getpid(), "-",
                       absl::ToUnixNanos(absl::Now()));
  if (mkdir(c.dir.c_str(), 0700) != 0) return absl::InternalError("mkdir failed");
  const std::string server_ext =
      "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
      "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
  const std::string client_ext =
      "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n";
  for (absl::Status s : {MakeCa(c.dir, "ca"), MakeCa(c.dir, "rogue-ca"),
                         MakeLeaf(c.dir, "ca", "server", "localhost", server_ext),
                         MakeLeaf(c.dir, "ca", "client-a", "tenant-a", client_ext),
                         MakeLeaf(c.dir, "ca", "client-b", "tenant-b", client_ext),
                         MakeLeaf(c.dir, "rogue-ca", "rogue", "tenant-a", client_ext)}) {
    if (!s.ok()) return s;
  }
  c.ca_file = c.dir + "/ca.pem";
  c.server_cert = c.dir + "/server.pem";
  c.server_key = c.dir + "/server.key";
  struct {
    std::string file;
    std::string* out;
  } reads[] = {{c.ca_file, &c.ca_pem},
               {c.dir + "/client-a.pem", &c.client_a_cert},
               {c.dir + "/client-a.key", &c.client_a_key},
               {c.dir + "/client-b.pem", &c.client_b_cert},
               {c.dir + "/client-b.key", &c.client_b_key},
               {c.dir + "/rogue.pem", &c.rogue_cert},
               {c.dir + "/rogue.key", &c.rogue_key}};
  for (auto& r : reads) {
    absl::StatusOr<std::string> text = Slurp(r.file);
    if (!text.ok()) return text.status();
    *r.out = *std::move(text);
  }
  return c;
}

}  // namespace kvbuffer::testing
