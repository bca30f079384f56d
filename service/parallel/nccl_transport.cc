#include "service/parallel/nccl_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace kvbuffer::parallel {
namespace {

std::string CudaMessage(cudaError_t e, const char* what) {
  return absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

std::string NcclMessage(ncclResult_t r, ncclComm_t comm, const char* what) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  return absl::StrCat(what, ": ", ncclGetErrorString(r),
                      last != nullptr && last[0] != '\0' ? absl::StrCat(" (", last, ")") : "");
}

// ncclRemoteError / ncclSystemError mean a peer or the network is gone: UNAVAILABLE; the rest
// are local faults: INTERNAL.
absl::StatusCode NcclCode(ncclResult_t r) {
  return r == ncclRemoteError || r == ncclSystemError ? absl::StatusCode::kUnavailable
                                                      : absl::StatusCode::kInternal;
}

// Backs off from spinning to sleeps while polling, by time waited: a decode step's transfers
// and kernels finish within the spinning window, where a sleep would cost its timer slack (tens
// of microseconds, more than a sleep of 5 us asks for) on every wait; a long wait (an idle worker
// between commands) should not burn a core.
class Backoff {
 public:
  void Pause() {
    const absl::Duration waited = absl::Now() - start_;
    if (waited < absl::Milliseconds(2)) {
      std::this_thread::yield();
    } else {
      absl::SleepFor(absl::Microseconds(waited < absl::Milliseconds(50) ? 20 : 200));
    }
  }

 private:
  const absl::Time start_ = absl::Now();
};

// Waits until a non-blocking communicator leaves ncclInProgress.
absl::Status WaitForComm(ncclComm_t comm, absl::Time deadline, const std::string& what) {
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) {
      return absl::Status(NcclCode(r), NcclMessage(r, comm, what.c_str()));
    }
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      return absl::Status(NcclCode(state), NcclMessage(state, comm, what.c_str()));
    }
    if (absl::Now() > deadline) {
      return absl::UnavailableError(absl::StrCat(what, ": not done before the deadline"));
    }
    backoff.Pause();
  }
}

ncclConfig_t NonBlockingConfig() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

class NcclTransport : public TpTransport {
 public:
  NcclTransport(ncclComm_t comm, cudaStream_t stream, int device, int32_t rank, int32_t world,
                absl::Duration enqueue_timeout)
      : comm_(comm),
        stream_(stream),
        device_(device),
        rank_(rank),
        world_(world),
        enqueue_timeout_(enqueue_timeout) {}

  ~NcclTransport() override {
    cudaSetDevice(device_);
    {
      absl::MutexLock lock(&mu_);
      // Abort rather than destroy: it never waits for peers that may be gone.
      if (comm_ != nullptr) ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    cudaStreamDestroy(stream_);
  }

  int32_t rank() const override { return rank_; }
  int32_t world_size() const override { return world_; }
  bool host_accessible() const override { return false; }
  void* stream() const override { return stream_; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    cudaSetDevice(device_);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          CudaMessage(e, absl::StrCat("cudaMalloc(", bytes, ") on GPU ", device_).c_str()));
    }
    return p;
  }
  void Free(void* p) override {
    cudaSetDevice(device_);
    cudaFree(p);
  }
  void* AllocateHost(size_t bytes) override {
    cudaSetDevice(device_);
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
  }
  void FreeHost(void* p) override { cudaFreeHost(p); }

  absl::Status CopyIn(void* dst, const void* src, size_t bytes) override {
    return Cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy in");
  }
  absl::Status CopyOut(void* dst, const void* src, size_t bytes) override {
    return Cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy out");
  }
  absl::Status CopyOut2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                         size_t width, size_t rows) override {
    return Cuda(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                  cudaMemcpyDeviceToHost, stream_),
                "strided copy out");
  }
  absl::Status Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                      size_t rows) override {
    return Cuda(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                  cudaMemcpyDeviceToDevice, stream_),
                "strided device copy");
  }

  absl::Status Broadcast(void* buf, size_t bytes) override {
    return Nccl(
        [&](ncclComm_t c) { return ncclBroadcast(buf, buf, bytes, ncclUint8, 0, c, stream_); },
        "ncclBroadcast");
  }
  absl::Status GroupStart() override {
    cudaSetDevice(device_);
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return health_;
    const ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) {
      return FailLocked(absl::InternalError(NcclMessage(r, nullptr, "ncclGroupStart")));
    }
    in_group_ = true;
    return absl::OkStatus();
  }
  absl::Status Send(const void* buf, size_t bytes, int32_t peer) override {
    return Nccl([&](ncclComm_t c) { return ncclSend(buf, bytes, ncclUint8, peer, c, stream_); },
                "ncclSend");
  }
  absl::Status Recv(void* buf, size_t bytes, int32_t peer) override {
    return Nccl([&](ncclComm_t c) { return ncclRecv(buf, bytes, ncclUint8, peer, c, stream_); },
                "ncclRecv");
  }
  absl::Status GroupEnd() override {
    cudaSetDevice(device_);
    absl::MutexLock lock(&mu_);
    if (!in_group_) return absl::FailedPreconditionError("GroupEnd without GroupStart");
    in_group_ = false;
    // Close the group even after a failure inside it (NCCL's group state is per thread), and
    // only then abort: the queued operations still reference the communicator.
    const ncclResult_t r = ncclGroupEnd();
    if (!health_.ok()) return FailLocked(health_);
    if (r == ncclSuccess) return absl::OkStatus();
    if (r != ncclInProgress) {
      return FailLocked(absl::Status(NcclCode(r), NcclMessage(r, comm_, "ncclGroupEnd")));
    }
    absl::Status w = WaitForComm(comm_, absl::Now() + enqueue_timeout_,
                                 absl::StrCat("tensor-parallel rank ", rank_, ": ncclGroupEnd"));
    return w.ok() ? w : FailLocked(w);
  }

  absl::Status Sync(absl::Duration timeout) override {
    cudaSetDevice(device_);
    const absl::Time deadline = absl::Now() + timeout;
    Backoff backoff;
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        if (!health_.ok()) return health_;
        if (abort_requested_.load()) {
          return FailLocked(absl::UnavailableError(
              absl::StrCat("tensor-parallel rank ", rank_, ": group aborted")));
        }
        const cudaError_t q = cudaStreamQuery(stream_);
        if (q == cudaSuccess) return absl::OkStatus();
        if (q != cudaErrorNotReady) {
          cudaGetLastError();
          return FailLocked(absl::InternalError(CudaMessage(
              q, absl::StrCat("tensor-parallel rank ", rank_, " on GPU ", device_).c_str())));
        }
        ncclResult_t state = ncclSuccess;
        ncclCommGetAsyncError(comm_, &state);
        if (state != ncclSuccess && state != ncclInProgress) {
          return FailLocked(absl::Status(
              NcclCode(state),
              NcclMessage(state, comm_, absl::StrCat("tensor-parallel rank ", rank_).c_str())));
        }
        if (absl::Now() > deadline) {
          return FailLocked(absl::UnavailableError(
              absl::StrCat("tensor-parallel rank ", rank_, ": transfers with the other ranks did ",
                           "not complete within ", absl::FormatDuration(timeout),
                           " (a rank died or hangs); group aborted")));
        }
      }
      backoff.Pause();
    }
  }

  void Abort() override {
    abort_requested_.store(true);
    absl::MutexLock lock(&mu_);
    FailLocked(absl::UnavailableError(absl::StrCat("tensor-parallel rank ", rank_, ": aborted")))
        .IgnoreError();
  }

  absl::Status Health() const override {
    absl::MutexLock lock(&mu_);
    return health_;
  }

 private:
  absl::Status Cuda(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return absl::OkStatus();
    cudaGetLastError();
    return Fail(absl::InternalError(CudaMessage(e, what)));
  }

  // Runs one NCCL call on the communicator; inside a group the work is deferred to GroupEnd,
  // outside it a non-blocking enqueue is awaited (with enqueue_timeout_) before returning.
  template <typename F>
  absl::Status Nccl(F call, const char* what) {
    cudaSetDevice(device_);
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return health_;
    const ncclResult_t r = call(comm_);
    if (r == ncclSuccess) return absl::OkStatus();
    if (r != ncclInProgress)
      return FailLocked(absl::Status(NcclCode(r), NcclMessage(r, comm_, what)));
    if (in_group_) return absl::OkStatus();
    absl::Status s = WaitForComm(comm_, absl::Now() + enqueue_timeout_,
                                 absl::StrCat("tensor-parallel rank ", rank_, ": ", what));
    return s.ok() ? s : FailLocked(s);
  }

  absl::Status Fail(absl::Status s) {
    absl::MutexLock lock(&mu_);
    return FailLocked(std::move(s));
  }

  // Records the failure and aborts the communicator, unless a group is open on the owning thread:
  // then GroupEnd aborts once the group is closed.
  absl::Status FailLocked(absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (health_.ok()) health_ = std::move(s);
    if (comm_ != nullptr && !in_group_) {
      cudaSetDevice(device_);
      ncclCommAbort(comm_);  // ends this rank's in-flight NCCL kernels; peers time out or error
      comm_ = nullptr;
    }
    return health_;
  }

  mutable absl::Mutex mu_;
  ncclComm_t comm_ ABSL_GUARDED_BY(mu_);
  cudaStream_t stream_;
  const int device_;
  const int32_t rank_;
  const int32_t world_;
  const absl::Duration enqueue_timeout_;
  bool in_group_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<bool> abort_requested_{false};
  absl::Status health_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<cudaStream_t> MakeStream(int device) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        CudaMessage(e, absl::StrCat("cudaSetDevice(", device, ")").c_str()));
  }
  cudaStream_t stream = nullptr;
  e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(CudaMessage(e, "cudaStreamCreate"));
  }
  return stream;
}

}  // namespace

void KeepNvlinkMulticastOff() { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); }

absl::StatusOr<std::string> NewNcclUniqueId() {
  KeepNvlinkMulticastOff();
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return absl::InternalError(NcclMessage(r, nullptr, "ncclGetUniqueId"));
  return std::string(id.internal, sizeof(id.internal));
}

std::string NcclVersionString() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  return absl::StrCat(v / 10000, ".", (v / 100) % 100, ".", v % 100);
}

absl::StatusOr<std::unique_ptr<TpTransport>> MakeNcclTransport(const std::string& unique_id,
                                                               int32_t rank, int32_t world,
                                                               int device,
                                                               absl::Duration init_timeout,
                                                               absl::Duration enqueue_timeout) {
  KeepNvlinkMulticastOff();
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL unique id has ", unique_id.size(),
                                                   " bytes, expected ", sizeof(id.internal)));
  }
  if (world < 1 || rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", world));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  absl::StatusOr<cudaStream_t> stream = MakeStream(device);
  if (!stream.ok()) return stream.status();
  ncclConfig_t config = NonBlockingConfig();
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, world, id, rank, &config);
  const std::string what = absl::StrCat("tensor-parallel rank ", rank, " of ", world, " on GPU ",
                                        device, " joining the group");
  absl::Status s;
  if (r != ncclSuccess && r != ncclInProgress) {
    s = absl::Status(NcclCode(r), NcclMessage(r, comm, what.c_str()));
  } else {
    s = WaitForComm(comm, absl::Now() + init_timeout, what);
  }
  if (!s.ok()) {
    if (comm != nullptr) ncclCommAbort(comm);
    cudaStreamDestroy(*stream);
    return s;
  }
  return std::unique_ptr<TpTransport>(
      new NcclTransport(comm, *stream, device, rank, world, enqueue_timeout));
}

absl::StatusOr<std::vector<std::unique_ptr<TpTransport>>> MakeNcclTransportsInProcess(
    const std::vector<int>& devices, absl::Duration init_timeout, absl::Duration enqueue_timeout) {
  KeepNvlinkMulticastOff();
  const int32_t world = static_cast<int32_t>(devices.size());
  if (world < 1) return absl::InvalidArgumentError("no devices");
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return absl::InternalError(NcclMessage(r, nullptr, "ncclGetUniqueId"));
  std::vector<cudaStream_t> streams;
  std::vector<ncclComm_t> comms(world, nullptr);
  auto cleanup = [&]() {
    for (int32_t i = 0; i < world; ++i) {
      cudaSetDevice(devices[i]);
      if (comms[i] != nullptr) ncclCommAbort(comms[i]);
    }
    for (size_t i = 0; i < streams.size(); ++i) {
      cudaSetDevice(devices[i]);
      cudaStreamDestroy(streams[i]);
    }
  };
  for (int device : devices) {
    absl::StatusOr<cudaStream_t> s = MakeStream(device);
    if (!s.ok()) {
      cleanup();
      return s.status();
    }
    streams.push_back(*s);
  }
  // One thread initialising every rank inside a group, as ncclCommInitAll does.
  ncclConfig_t config = NonBlockingConfig();
  r = ncclGroupStart();
  for (int32_t i = 0; r == ncclSuccess && i < world; ++i) {
    cudaSetDevice(devices[i]);
    const ncclResult_t ri = ncclCommInitRankConfig(&comms[i], world, id, i, &config);
    if (ri != ncclSuccess && ri != ncclInProgress) r = ri;
  }
  const ncclResult_t end = ncclGroupEnd();
  if (r == ncclSuccess && end != ncclSuccess && end != ncclInProgress) r = end;
  if (r != ncclSuccess) {
    cleanup();
    return absl::InternalError(NcclMessage(r, nullptr, "in-process NCCL group init"));
  }
  const absl::Time deadline = absl::Now() + init_timeout;
  for (int32_t i = 0; i < world; ++i) {
    cudaSetDevice(devices[i]);
    absl::Status s = WaitForComm(comms[i], deadline,
                                 absl::StrCat("tensor-parallel rank ", i, " on GPU ", devices[i]));
    if (!s.ok()) {
      cleanup();
      return s;
    }
  }
  std::vector<std::unique_ptr<TpTransport>> out;
  for (int32_t i = 0; i < world; ++i) {
    out.push_back(std::unique_ptr<TpTransport>(
        new NcclTransport(comms[i], streams[i], devices[i], i, world, enqueue_timeout)));
  }
  return out;
}

}  // namespace kvbuffer::parallel
