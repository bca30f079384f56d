// The TSan configuration must not hide races in our code: under the same settings as the suites
// (the preloaded absl::Mutex annotations and tests/sanitizers/tsan.supp, both inherited from the
// environment scripts/sanitizers.sh sets), each racy scenario below, run in a child process, is
// reported as a data race naming our function, and its correctly synchronized twin is not.
// The scenarios: two plain threads; an absl::Mutex taken by one side only; and a gRPC callback
// thread against the main thread (frames of the uninstrumented gRPC libraries on the stack).
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace kvbuffer::canary {

int g_counter = 0;
absl::Mutex g_mu;
bool g_locked = false;  // the synchronized twin: every Bump holds g_mu

// The access TSan must see. Not inlined, so that the report names it.
__attribute__((noinline)) void Bump() {
  if (g_locked) {
    absl::MutexLock lock(&g_mu);
    ++g_counter;
  } else {
    ++g_counter;
  }
}

void TwoThreads() {
  std::thread a([] {
    for (int i = 0; i < 1000; ++i) Bump();
  });
  std::thread b([] {
    for (int i = 0; i < 1000; ++i) Bump();
  });
  a.join();
  b.join();
}

// One side locks, the other does not: still a race (the annotations must not over-synchronize).
void OneSideLocked() {
  std::thread a([] {
    for (int i = 0; i < 1000; ++i) {
      absl::MutexLock lock(&g_mu);
      ++g_counter;
    }
  });
  for (int i = 0; i < 1000; ++i) Bump();
  a.join();
}

// A generic callback service whose reactor bumps on a gRPC thread.
class BumpingService final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Reactor final : public grpc::ServerGenericBidiReactor {
     public:
      Reactor() {
        Bump();
        absl::SleepFor(absl::Milliseconds(50));  // the main thread bumps meanwhile
        Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "canary"));
      }
      // Not deleted: the Finish above, called before gRPC binds the reactor, is done by gRPC's
      // bind under the reactor's mutex, and the bind unlocks it after handing the Finish on. For
      // ByteBuffer streams that bind and the OnDone that follows run in the uninstrumented
      // libgrpc++, so TSan cannot see their order, and deleting the reactor here was reported
      // now and then as a race, failing the synchronized twin. The process ends after the call.
      void OnDone() override {}
    };
    return new Reactor();
  }
};

void FromAGrpcCallback() {
  BumpingService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  std::atomic<bool> done{false};
  std::thread client([&] {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    stub->Check(&context, request, &response).error_code();
    done.store(true, std::memory_order_relaxed);
  });
  // Relaxed loads create no happens-before edge: the bumps after the callback's are unordered.
  while (!done.load(std::memory_order_relaxed)) Bump();
  client.join();
  server->Shutdown();
}

// Runs scenario `name` (prefix "locked-" for the synchronized twin); the process's exit code.
int RunScenario(const std::string& name) {
  std::string what = name;
  if (what.rfind("locked-", 0) == 0) {
    g_locked = true;
    what = what.substr(7);
  }
  if (what == "threads") TwoThreads();
  if (what == "one-side-locked") OneSideLocked();
  if (what == "grpc") FromAGrpcCallback();
  std::printf("counter %d\n", g_counter);
  return 0;
}

namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string self_path;

// Runs this binary with `scenario`; its exit code and stderr.
std::pair<int, std::string> RunChild(const std::string& scenario) {
  // The child reports on stderr even where the suites send reports to files (log_path).
  const char* inherited = std::getenv("TSAN_OPTIONS");
  const std::string options =
      std::string(inherited != nullptr ? inherited : "") + " log_path=stderr";
  int err[2];
  EXPECT_EQ(pipe(err), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(err[1], STDERR_FILENO);
    close(err[0]);
    setenv("TSAN_OPTIONS", options.c_str(), 1);
    execl(self_path.c_str(), self_path.c_str(), "--canary", scenario.c_str(), nullptr);
    _exit(127);
  }
  close(err[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(err[0], buf, sizeof(buf))) > 0;) out.append(buf, n);
  close(err[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

class CanaryTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CanaryTest, ARaceInOurCodeIsReported) {
  auto [code, err] = RunChild(GetParam());
  EXPECT_THAT(err, HasSubstr("WARNING: ThreadSanitizer: data race"));
  EXPECT_THAT(err, HasSubstr("kvbuffer::canary::Bump"));
  EXPECT_EQ(code, 66) << err;  // TSan's exit code when it reported
}

TEST_P(CanaryTest, TheSynchronizedTwinIsNotReported) {
  if (GetParam() == "one-side-locked") GTEST_SKIP() << "has no synchronized twin";
  auto [code, err] = RunChild("locked-" + GetParam());
  EXPECT_THAT(err, Not(HasSubstr("WARNING: ThreadSanitizer")));
  EXPECT_EQ(code, 0) << err;
}

INSTANTIATE_TEST_SUITE_P(Scenarios, CanaryTest,
                         ::testing::Values("threads", "one-side-locked", "grpc"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n) {
                             if (c == '-') c = '_';
                           }
                           return n;
                         });

}  // namespace
}  // namespace kvbuffer::canary

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--canary") == 0) {
    return kvbuffer::canary::RunScenario(argv[2]);
  }
  kvbuffer::canary::self_path = "/proc/self/exe";
  char path[4096];
  const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n > 0) kvbuffer::canary::self_path.assign(path, static_cast<size_t>(n));
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
