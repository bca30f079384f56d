// The tensor-parallel group over NCCL on a machine with at least 2 GPUs (skips otherwise):
//   - mode A (one process, both GPUs) and mode B (rank 1 in a child process started from this
//     binary) with CPU shard backends staged through the GPUs: bit for bit equal to one CPU
//     backend, so the NCCL data path itself is exact;
//   - with CUDA shard backends (when the CUDA backend is built): equal to TP = 1 within tolerance;
//   - a worker process killed with SIGKILL turns into UNAVAILABLE and a broken group within the
//     deadline, never a hung call.
// NCCL_NVLS_ENABLE=0 is set before any NCCL call (NVLink multicast stays off).
#include <cuda_runtime.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "gtest/gtest.h"
#include "service/engine/engine_test_suite.h"
#include "service/parallel/nccl_group.h"
#include "service/parallel/nccl_transport.h"
#include "service/parallel/twin_engines.h"

#if defined(KVB_TP_HAVE_CUDA_BACKEND)
#include "service/engine/cuda/cuda_backend.h"
#endif

extern char** environ;

namespace kvbuffer::parallel {
namespace {

int VisibleGpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

#define KVB_NEED_TWO_GPUS() \
  if (VisibleGpus() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << VisibleGpus()

// Shard backends: "cpu" (exact; staged through the GPU transport) or "cuda".
std::unique_ptr<Backend> MakeShardBackend(const std::string& kind, int device) {
  if (kind == "cpu") return MakeCpuBackend();
#if defined(KVB_TP_HAVE_CUDA_BACKEND)
  if (kind == "cuda") return MakeCudaBackend(device);
#endif
  (void)device;
  return nullptr;
}

// The CudaBackend's device entry point, when it has one (see README.md).
DeviceStepFn DeviceStep(const std::string& kind) {
#if defined(KVB_TP_HAVE_CUDA_BACKEND) && defined(KVB_CUDA_BACKEND_DEVICE_STEP)
  if (kind == "cuda") {
    return [](Backend& b, const LayerStep& step, void* stream) {
      return RunLayerStepOnDevice(b, step, stream);
    };
  }
#endif
  (void)kind;
  return nullptr;
}

// direct: host steps go straight to each rank's backend (the default of mode A); false: every
// step takes the NCCL rank protocol (mode B's path).
NcclGroupOptions GroupOptions(const std::string& kind, size_t command_bytes, bool direct) {
  NcclGroupOptions o;
  o.tp.command_bytes = command_bytes;
  o.tp.direct_host_steps = direct;
  o.tp.op_timeout = absl::Seconds(20);
  o.tp.heartbeat_interval = absl::Milliseconds(200);
  o.tp.idle_timeout = absl::Seconds(10);
  o.init_timeout = absl::Seconds(60);
  o.make_backend = [kind](int32_t, int device) { return MakeShardBackend(kind, device); };
  o.device_step = DeviceStep(kind);
  return o;
}

void RunAllScenarios(testing::TwinEngines& twin) {
  // The scenarios share one pair of engines: close each one's ids before the next reuses them.
  ASSERT_NO_FATAL_FAILURE(twin.PrefillShortStatelessAndChunkedThenDecode());
  ASSERT_NO_FATAL_FAILURE(twin.Close({1, 2, 3, 4, 5}));
  ASSERT_NO_FATAL_FAILURE(twin.VerifyAndCommitEveryAcceptCount());
  std::vector<uint64_t> verified;
  for (int32_t a = 0; a <= twin.options().max_drafts; ++a) verified.push_back(10 + a);
  ASSERT_NO_FATAL_FAILURE(twin.Close(verified));
  ASSERT_NO_FATAL_FAILURE(twin.FlushStatelessAndReopenedSequences());
  ASSERT_NO_FATAL_FAILURE(twin.Close({1, 2, 3, 4}));
  ASSERT_NO_FATAL_FAILURE(twin.EveryActivationAndOutputDtype());
}

class ModeATest : public ::testing::TestWithParam<size_t> {};

TEST_P(ModeATest, CpuShardsOverNcclAreBitExact) {
  KVB_NEED_TWO_GPUS();
  auto group = MakeNcclGroupInProcess({0, 1}, GroupOptions("cpu", GetParam(), /*direct=*/false));
  ASSERT_TRUE(group.ok()) << group.status();
  testing::TwinEngines twin;
  ASSERT_NO_FATAL_FAILURE(
      twin.Init(testing::TwinOptions(DType::kFloat32), MakeCpuBackend(), *std::move(group)));
  RunAllScenarios(twin);
}

// 64 KiB: small calls in one broadcast; 1 KiB: metadata and activations in round B.
INSTANTIATE_TEST_SUITE_P(CommandBlocks, ModeATest, ::testing::Values(64 << 10, 1 << 10));

TEST(ModeADirectTest, CpuShardsWithDirectHostStepsAreBitExact) {
  KVB_NEED_TWO_GPUS();
  auto group = MakeNcclGroupInProcess({0, 1}, GroupOptions("cpu", 8 << 10, /*direct=*/true));
  ASSERT_TRUE(group.ok()) << group.status();
  testing::TwinEngines twin;
  ASSERT_NO_FATAL_FAILURE(
      twin.Init(testing::TwinOptions(DType::kFloat32), MakeCpuBackend(), *std::move(group)));
  RunAllScenarios(twin);
}

#if defined(KVB_TP_HAVE_CUDA_BACKEND)
class ModeACudaTest : public ::testing::TestWithParam<bool> {};

TEST_P(ModeACudaTest, CudaShardsMatchOneGpu) {
  KVB_NEED_TWO_GPUS();
  auto group = MakeNcclGroupInProcess({0, 1}, GroupOptions("cuda", 64 << 10, GetParam()));
  ASSERT_TRUE(group.ok()) << group.status();
  testing::TwinEngines twin;
  ASSERT_NO_FATAL_FAILURE(twin.Init(testing::TwinOptions(DType::kFloat32), MakeCudaBackend(0),
                                    *std::move(group), /*tolerance=*/1e-5));
  RunAllScenarios(twin);
  std::printf("TP=2 vs TP=1 (CUDA, %s): worst relative difference %.3g\n",
              GetParam() ? "direct host steps" : "steps through the protocol", twin.worst());
}

INSTANTIATE_TEST_SUITE_P(DirectOrProtocol, ModeACudaTest, ::testing::Bool());

// Mode A, direct host steps: a rank whose GPU does not finish in time (CudaBackendOptions::
// sync_timeout; 1 ns makes rank 1 "hang" on its first real work) turns into an error on that call
// and a broken group (health, on_broken), never a hung caller; later calls fail at once.
TEST(ModeACudaTest, HungRankGpuBreaksTheGroupInsteadOfHanging) {
  KVB_NEED_TWO_GPUS();
  NcclGroupOptions g = GroupOptions("cuda", 64 << 10, /*direct=*/true);
  g.make_backend = [](int32_t rank, int device) {
    CudaBackendOptions o;
    o.device = device;
    if (rank == 1) o.sync_timeout = absl::Nanoseconds(1);
    return MakeCudaBackend(o);
  };
  std::atomic<int> broken_calls{0};
  g.tp.on_broken = [&broken_calls](const absl::Status&) { ++broken_calls; };
  auto group = MakeNcclGroupInProcess({0, 1}, std::move(g));
  ASSERT_TRUE(group.ok()) << group.status();
  TpBackend* tp = group->get();
  EngineOptions o = testing::TwinOptions(DType::kFloat32);
  auto engine = Engine::Create(o, *std::move(group));
  ASSERT_TRUE(engine.ok()) << engine.status();
  const ModelConfig& m = o.model;
  constexpr int64_t T = 4096;
  std::vector<float> qkv(T * m.channels(), 0.25f), ab(T * m.num_v_heads, 0.5f);
  LayerCall call;
  call.sequences = {{1, 0, static_cast<int32_t>(T)}};
  call.qkv = {DType::kFloat32, {T, m.channels()}, qkv.data(), qkv.size() * 4};
  call.a = {DType::kFloat32, {T, m.num_v_heads}, ab.data(), ab.size() * 4};
  call.b = call.a;
  const auto start = std::chrono::steady_clock::now();
  absl::Status first = (*engine)->Open("", {1});
  if (first.ok()) first = (*engine)->Prefill(call).status();
  ASSERT_FALSE(first.ok());
  EXPECT_TRUE(first.code() == absl::StatusCode::kUnavailable ||
              first.code() == absl::StatusCode::kInternal)
      << first;
  EXPECT_FALSE(tp->Health().ok());
  EXPECT_EQ(broken_calls.load(), 1);
  const absl::Status later = (*engine)->Prefill(call).status();
  EXPECT_FALSE(later.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  std::printf("hung rank: first error %s; later %s\n", first.ToString().c_str(),
              later.ToString().c_str());
}
#endif

// The engine's typed suite (fp64 oracle, retries, errors, admission) over 2 ranks on 2 GPUs.
std::unique_ptr<Backend> MakeGroup(const std::string& kind, bool direct) {
  if (VisibleGpus() < 2 || (kind == "cuda" && MakeShardBackend("cuda", 0) == nullptr)) {
    return nullptr;  // the suite skips
  }
  auto group = MakeNcclGroupInProcess({0, 1}, GroupOptions(kind, 8 << 10, direct));
  EXPECT_TRUE(group.ok()) << group.status();
  return group.ok() ? std::unique_ptr<Backend>(*std::move(group)) : nullptr;
}
std::unique_ptr<Backend> MakeCpuGroup() { return MakeGroup("cpu", false); }
std::unique_ptr<Backend> MakeCudaGroup() { return MakeGroup("cuda", true); }
std::unique_ptr<Backend> MakeCudaGroupProtocol() { return MakeGroup("cuda", false); }

}  // namespace

namespace testing_suite {
using ::kvbuffer::testing::EngineSuite;
INSTANTIATE_TEST_SUITE_P(NcclCpuShards2, EngineSuite, ::testing::Values(&MakeCpuGroup));
INSTANTIATE_TEST_SUITE_P(NcclCudaShards2, EngineSuite, ::testing::Values(&MakeCudaGroup));
INSTANTIATE_TEST_SUITE_P(NcclCudaShards2Protocol, EngineSuite,
                         ::testing::Values(&MakeCudaGroupProtocol));
}  // namespace testing_suite

namespace {

// Mode B: rank 1 runs in a child process of this binary (started with --tp_worker=...).
struct Child {
  pid_t pid = -1;
};

Child SpawnWorker(const std::string& id, const std::string& kind, size_t command_bytes) {
  const std::string self = "/proc/self/exe";
  std::vector<std::string> args = {self, "--tp_worker=" + absl::BytesToHexString(id),
                                   "--tp_kind=" + kind,
                                   "--tp_command_bytes=" + std::to_string(command_bytes)};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  Child c;
  if (posix_spawn(&c.pid, self.c_str(), nullptr, nullptr, argv.data(), environ) != 0) c.pid = -1;
  return c;
}

int WaitChild(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(ModeBTest, WorkerProcessOverNcclIsBitExactAndLeavesOnShutdown) {
  KVB_NEED_TWO_GPUS();
  auto id = NewNcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  Child child = SpawnWorker(*id, "cpu", 4 << 10);
  ASSERT_GT(child.pid, 0);
  {
    auto leader = MakeNcclGroupLeader(*id, 2, 0, GroupOptions("cpu", 4 << 10, false));
    ASSERT_TRUE(leader.ok()) << leader.status();
    testing::TwinEngines twin;
    ASSERT_NO_FATAL_FAILURE(
        twin.Init(testing::TwinOptions(DType::kBFloat16), MakeCpuBackend(), *std::move(leader)));
    RunAllScenarios(twin);
  }  // rank 0 goes: kShutdown
  EXPECT_EQ(WaitChild(child.pid), 0);
}

TEST(ModeBTest, KilledWorkerTurnsIntoUnavailableNotAHang) {
  KVB_NEED_TWO_GPUS();
  auto id = NewNcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  Child child = SpawnWorker(*id, "cpu", 64 << 10);
  ASSERT_GT(child.pid, 0);
  NcclGroupOptions o = GroupOptions("cpu", 64 << 10, false);
  o.tp.op_timeout = absl::Seconds(5);
  std::atomic<int> broken{0};
  o.tp.on_broken = [&broken](const absl::Status&) { ++broken; };
  auto leader = MakeNcclGroupLeader(*id, 2, 0, o);
  ASSERT_TRUE(leader.ok()) << leader.status();
  TpBackend* tp = leader->get();
  auto engine = Engine::Create(testing::TwinOptions(DType::kFloat32), *std::move(leader));
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->Open("", {1}).ok());
  kill(child.pid, SIGKILL);
  WaitChild(child.pid);
  const absl::Time start = absl::Now();
  // The next call (or a heartbeat before it) finds rank 1 gone.
  absl::Status s = (*engine)->Open("", {2});
  while (s.ok() && absl::Now() - start < absl::Seconds(30)) {
    absl::SleepFor(absl::Milliseconds(100));
    s = tp->Health();
  }
  // UNAVAILABLE when the deadline passes or NCCL reports the peer gone; INTERNAL if NCCL calls it
  // an internal error.
  auto failed = [](const absl::Status& st) {
    return st.code() == absl::StatusCode::kUnavailable || st.code() == absl::StatusCode::kInternal;
  };
  EXPECT_TRUE(failed(s)) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(15));
  EXPECT_TRUE(failed(tp->Health())) << tp->Health();
  EXPECT_EQ(broken.load(), 1);
  // Later calls that reach the ranks fail at once (a Flush with nothing buffered would not).
  EXPECT_TRUE(failed((*engine)->Open("", {3})));
}

// The child side of mode B: rank 1 on GPU 1 until shutdown.
int WorkerMain(const std::string& hex_id, const std::string& kind, size_t command_bytes) {
  const std::string id = absl::HexStringToBytes(hex_id);
  absl::Status s = RunNcclGroupWorker(id, 1, 2, 1, GroupOptions(kind, command_bytes, false));
  if (!s.ok()) std::fprintf(stderr, "tp worker: %s\n", s.ToString().c_str());
  return s.ok() ? 0 : 1;
}

}  // namespace
}  // namespace kvbuffer::parallel

int main(int argc, char** argv) {
  kvbuffer::parallel::KeepNvlinkMulticastOff();
  std::string worker, kind = "cpu";
  size_t command_bytes = 64 << 10;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--tp_worker=", 0) == 0) worker = a.substr(12);
    if (a.rfind("--tp_kind=", 0) == 0) kind = a.substr(10);
    if (a.rfind("--tp_command_bytes=", 0) == 0) command_bytes = std::stoul(a.substr(19));
  }
  if (!worker.empty()) return kvbuffer::parallel::WorkerMain(worker, kind, command_bytes);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
