// Servers for the integration tests: one in this process (CPU backend, any engine options) and
// kvbuffer-server as a child process on an ephemeral port of 127.0.0.1.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"
#include "service/engine/engine_options.h"
#include "service/server/executor.h"
#include "service/server/kvbuffer_server.h"

namespace kvbuffer::testing {

// Engine options of the small preset with pools that fit the tests.
EngineOptions SmallModelOptions();

// A KvbufferServer on 127.0.0.1:0 in this process, on the CPU backend.
class InProcessServer {
 public:
  // Starts it (fails the calling test on error); `executor` null = a new one of 2 threads;
  // `backend` null = the CPU backend.
  static std::unique_ptr<InProcessServer> Start(
      EngineOptions engine = SmallModelOptions(), server::ServerOptions options = {},
      std::unique_ptr<server::Executor> executor = nullptr,
      std::unique_ptr<Backend> backend = nullptr);

  std::string address() const { return server_->dial_address(); }
  server::KvbufferServer* server() { return server_.get(); }
  Engine* engine() { return server_->engine(); }

 private:
  std::unique_ptr<server::KvbufferServer> server_;
};

// kvbuffer-server in a child process (--backend=cpu --host=127.0.0.1 --port=0 plus `args`).
class ChildServer {
 public:
  // Starts it and waits for its "listening on" line.
  static absl::StatusOr<std::unique_ptr<ChildServer>> Start(const std::vector<std::string>& args);
  // Kills it if it still runs.
  ~ChildServer();

  std::string address() const { return address_; }
  pid_t pid() const { return pid_; }

  // Sends `sig` to the child.
  void Signal(int sig);

  // Waits up to `timeout` for the child to exit; its exit code, or an error on timeout or a
  // death by signal.
  absl::StatusOr<int> WaitExit(absl::Duration timeout);

  // What the child wrote on stderr so far.
  std::string Stderr() const;

  // The next line the child writes on stdout (after "listening on ..."), within `timeout`.
  absl::StatusOr<std::string> ReadStdoutLine(absl::Duration timeout);

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;  // kept open so the child never writes into a closed pipe
  bool exited_ = false;
  std::string address_;
  std::string stderr_path_;
};

// Starts `argv` in the background with stdout and stderr discarded; its pid.
absl::StatusOr<pid_t> SpawnProgram(const std::vector<std::string>& argv);

// Waits up to `timeout` for child `pid` to end; how it ended ("exit N" or "signal N").
absl::StatusOr<std::string> WaitProgram(pid_t pid, absl::Duration timeout);

// Runs `argv` to completion, returns its exit code and fills `output` with stdout.
absl::StatusOr<int> RunProgram(const std::vector<std::string>& argv, std::string* output,
                               absl::Duration timeout);

// GET http://127.0.0.1:`port``path`; the whole response (status line, headers and body).
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);

// Paths of the binaries under test.
std::string ServerBinary();
std::string MockWorkerBinary();

}  // namespace kvbuffer::testing
