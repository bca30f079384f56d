#include "tests/integration/test_servers.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "service/engine/cpu_backend.h"
#include "service/engine/engine.h"

namespace kvbuffer::testing {

std::string ServerBinary() { return KVB_SERVER_BINARY; }
std::string MockWorkerBinary() { return KVB_MOCK_WORKER_BINARY; }

EngineOptions SmallModelOptions() {
  EngineOptions o;
  EXPECT_TRUE(ModelPreset("small", &o.model));
  o.max_sequences = 64;
  o.state_slots = 48;
  o.buffer_pages = 512;
  return o;
}

std::unique_ptr<InProcessServer> InProcessServer::Start(EngineOptions engine,
                                                        server::ServerOptions options,
                                                        std::unique_ptr<server::Executor> executor,
                                                        std::unique_ptr<Backend> backend) {
  if (!backend) backend = MakeCpuBackend();
  absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(std::move(engine), std::move(backend));
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return nullptr;
  options.host = "127.0.0.1";
  options.port = 0;
  options.executor_threads = 2;
  options.identity.version = "test";
  absl::StatusOr<std::unique_ptr<server::KvbufferServer>> s =
      server::KvbufferServer::Start(std::move(options), std::move(*e), std::move(executor));
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return nullptr;
  auto out = std::unique_ptr<InProcessServer>(new InProcessServer());
  out->server_ = std::move(*s);
  return out;
}

namespace {

std::vector<char*> Argv(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  return argv;
}

// Reads one line from `fd` within `timeout`.
absl::StatusOr<std::string> ReadLine(int fd, absl::Duration timeout) {
  std::string line;
  const absl::Time until = absl::Now() + timeout;
  while (absl::Now() < until) {
    pollfd p{fd, POLLIN, 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(until - absl::Now()));
    if (poll(&p, 1, ms > 0 ? ms : 1) <= 0) continue;
    char c;
    const ssize_t n = read(fd, &c, 1);
    if (n <= 0) return absl::UnavailableError(absl::StrCat("stdout closed after \"", line, "\""));
    if (c == '\n') return line;
    line.push_back(c);
  }
  return absl::DeadlineExceededError(absl::StrCat("no line within the timeout: \"", line, "\""));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ChildServer>> ChildServer::Start(
    const std::vector<std::string>& args) {
  std::vector<std::string> all = {ServerBinary(), "--backend=cpu", "--host=127.0.0.1", "--port=0"};
  all.insert(all.end(), args.begin(), args.end());
  auto child = std::unique_ptr<ChildServer>(new ChildServer());
  child->stderr_path_ = absl::StrCat(::testing::TempDir(), "/kvbuffer-server-", getpid(), "-",
                                     absl::ToUnixNanos(absl::Now()), ".stderr");
  int out[2];
  if (pipe(out) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    const int err = open(child->stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (err >= 0) dup2(err, STDERR_FILENO);
    close(out[0]);
    std::vector<char*> argv = Argv(all);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out[1]);
  child->pid_ = pid;
  child->stdout_fd_ = out[0];
  absl::StatusOr<std::string> line = ReadLine(out[0], absl::Seconds(30));
  if (!line.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "kvbuffer-server did not start: ", line.status().message(), "; stderr: ", child->Stderr()));
  }
  absl::string_view rest = *line;
  if (!absl::ConsumePrefix(&rest, "listening on ")) {
    return absl::InternalError(absl::StrCat("unexpected first line: ", *line));
  }
  child->address_ = std::string(rest);
  return child;
}

ChildServer::~ChildServer() {
  if (pid_ > 0 && !exited_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (stdout_fd_ >= 0) close(stdout_fd_);
  if (!stderr_path_.empty()) std::remove(stderr_path_.c_str());
}

void ChildServer::Signal(int sig) { kill(pid_, sig); }

absl::StatusOr<int> ChildServer::WaitExit(absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  while (absl::Now() < until) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exited_ = true;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      return absl::InternalError(absl::StrCat("killed by signal ", WTERMSIG(status)));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError("still running");
}

absl::StatusOr<std::string> ChildServer::ReadStdoutLine(absl::Duration timeout) {
  return ReadLine(stdout_fd_, timeout);
}

std::string ChildServer::Stderr() const {
  std::ifstream in(stderr_path_);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::StatusOr<pid_t> SpawnProgram(const std::vector<std::string>& args) {
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    const int null = open("/dev/null", O_WRONLY);
    if (null >= 0) {
      dup2(null, STDOUT_FILENO);
      dup2(null, STDERR_FILENO);
    }
    std::vector<char*> argv = Argv(args);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

absl::StatusOr<std::string> WaitProgram(pid_t pid, absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  while (absl::Now() < until) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      if (WIFEXITED(status)) return absl::StrCat("exit ", WEXITSTATUS(status));
      return absl::StrCat("signal ", WTERMSIG(status));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::DeadlineExceededError(absl::StrCat("process ", pid, " still running"));
}

absl::StatusOr<int> RunProgram(const std::vector<std::string>& args, std::string* output,
                               absl::Duration timeout) {
  int out[2];
  if (pipe(out) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    close(out[0]);
    std::vector<char*> argv = Argv(args);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out[1]);
  output->clear();
  const absl::Time until = absl::Now() + timeout;
  char buf[4096];
  for (;;) {
    pollfd p{out[0], POLLIN, 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(until - absl::Now()));
    if (ms <= 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      close(out[0]);
      return absl::DeadlineExceededError(absl::StrCat(args[0], " timed out; output: ", *output));
    }
    if (poll(&p, 1, ms) <= 0) continue;
    const ssize_t n = read(out[0], buf, sizeof(buf));
    if (n <= 0) break;
    output->append(buf, static_cast<size_t>(n));
  }
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status)) return absl::InternalError("killed by a signal");
  return WEXITSTATUS(status);
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect to port ", port, " failed"));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::InternalError("write failed");
  }
  std::string out;
  char buf[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 10000) <= 0) break;
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

}  // namespace kvbuffer::testing
