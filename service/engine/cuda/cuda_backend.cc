// CudaBackend: device pools, per-call uploads through pinned staging, and the kernel sequence of
// each Backend operation. One stream; one host synchronisation at the end of each call, except
// RunLayerStepOnDevice, which orders its work on the caller's stream through events.
#include "service/engine/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kernels/cuda/buffered_step.h"
#include "kernels/cuda/chunked_prefill.h"
#include "kernels/cuda/gdn_device.h"
#include "kernels/cuda/token_prep.h"
#include "service/engine/backend_validation.h"

namespace kvbuffer {
namespace {

namespace kc = ::kvbuffer::cuda;

absl::Status CudaError(cudaError_t e, const char* what) {
  return absl::InternalError(absl::StrCat("CUDA error in ", what, ": ", cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ")"));
}

#define KVB_CUDA_RETURN(expr)                                       \
  do {                                                              \
    const cudaError_t kvb_err_ = (expr);                            \
    if (kvb_err_ != cudaSuccess) return CudaError(kvb_err_, #expr); \
  } while (0)

bool ValidDType(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

size_t AlignUp(size_t x, size_t a = 256) { return (x + a - 1) / a * a; }

// A device allocation that grows on demand (calls are serialised and synchronised at their end,
// so nothing is in flight when it grows).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t cap = 0;
  cudaError_t Reserve(size_t bytes) {
    if (bytes <= cap) return cudaSuccess;
    if (ptr != nullptr) cudaFree(ptr);
    ptr = nullptr;
    cap = 0;
    const size_t want = std::max<size_t>(AlignUp(bytes + bytes / 4), 1 << 20);
    cudaError_t e = cudaMalloc(&ptr, want);
    if (e == cudaSuccess) cap = want;
    return e;
  }
  void Release() {
    if (ptr != nullptr) cudaFree(ptr);
    ptr = nullptr;
    cap = 0;
  }
};

// Pinned host staging that grows on demand.
struct PinnedBuffer {
  void* ptr = nullptr;
  size_t cap = 0;
  cudaError_t Reserve(size_t bytes) {
    if (bytes <= cap) return cudaSuccess;
    if (ptr != nullptr) cudaFreeHost(ptr);
    ptr = nullptr;
    cap = 0;
    const size_t want = std::max<size_t>(AlignUp(bytes + bytes / 4), 1 << 20);
    cudaError_t e = cudaHostAlloc(&ptr, want, cudaHostAllocDefault);
    if (e == cudaSuccess) cap = want;
    return e;
  }
  void Release() {
    if (ptr != nullptr) cudaFreeHost(ptr);
    ptr = nullptr;
    cap = 0;
  }
};

// True if `p` is page-locked host memory, which copies to and from the device can use directly.
bool IsPageLocked(const void* p) {
  cudaPointerAttributes a{};
  if (p == nullptr || cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

// Sections of one upload: host bytes appended at 256-byte aligned offsets. Staged parts go
// through the pinned staging buffer (one copy there, one transfer); direct parts, already in
// page-locked memory, are transferred from where they are.
class Upload {
 public:
  template <typename T>
  size_t Add(const T* data, size_t count) {
    return AddBytes(data, count * sizeof(T));
  }
  size_t AddBytes(const void* data, size_t bytes, bool direct = false) {
    const size_t at = AlignUp(size_);
    parts_.push_back({at, data, bytes, direct});
    size_ = at + bytes;
    if (!direct) staged_size_ = size_;
    return at;
  }
  // Empties the upload (keeps its memory).
  void Clear() {
    parts_.clear();
    size_ = 0;
    staged_size_ = 0;
  }
  size_t size() const { return size_; }
  // Bytes from the start up to the end of the last staged part.
  size_t staged_size() const { return staged_size_; }
  void CopyTo(uint8_t* dst) const {
    for (const Part& p : parts_) {
      if (p.bytes > 0 && !p.direct) std::memcpy(dst + p.at, p.data, p.bytes);
    }
  }
  // Calls fn(at, src, bytes) for each run of direct parts that are laid out in the source as
  // they are in the upload (gaps included), so that one transfer covers a run.
  template <typename F>
  cudaError_t ForEachDirectRun(F fn) const {
    size_t run_at = 0, run_end = 0;
    const uint8_t* run_src = nullptr;
    for (const Part& p : parts_) {
      if (!p.direct || p.bytes == 0) continue;
      const auto* src = static_cast<const uint8_t*>(p.data);
      if (run_src != nullptr && src == run_src + (p.at - run_at)) {
        run_end = p.at + p.bytes;
        continue;
      }
      if (run_src != nullptr) {
        if (cudaError_t e = fn(run_at, run_src, run_end - run_at); e != cudaSuccess) return e;
      }
      run_at = p.at;
      run_end = p.at + p.bytes;
      run_src = src;
    }
    return run_src != nullptr ? fn(run_at, run_src, run_end - run_at) : cudaSuccess;
  }

 private:
  struct Part {
    size_t at;
    const void* data;
    size_t bytes;
    bool direct;
  };
  std::vector<Part> parts_;
  size_t size_ = 0;
  size_t staged_size_ = 0;
};

// One launch of the buffered kernel (plus its prep) over slices of items.
struct Round {
  std::vector<kc::StepDesc> descs;
  std::vector<kc::PrepUnit> units;
  int32_t max_tokens = 0;
  int32_t max_rows = 0;
  bool any_fold = false;
  size_t descs_at = 0, units_at = 0;
  // Set by OrderForStreaming (kc::StepArgs::stream_*).
  int32_t stream_begin = -1, stream_fold_end = -1, stream_max_tokens = 0, stream_max_rows = 0;

  // Empties the round for the next step (keeps its memory).
  void Reset() {
    descs.clear();
    units.clear();
    max_tokens = max_rows = 0;
    any_fold = false;
    descs_at = units_at = 0;
    stream_begin = stream_fold_end = -1;
    stream_max_tokens = stream_max_rows = 0;
  }
};

// Per-step planning memory a backend keeps between steps, so that a warm step allocates nothing.
struct StepScratch {
  std::vector<Round> rounds;  // the first num_rounds are this step's
  size_t num_rounds = 0;
  std::vector<kc::StepDesc> pre_fold, chunk_descs, sorted;
  std::vector<kc::PrepUnit> chunk_prep;
  std::vector<kc::ChunkUnit> chunk_units;
  std::vector<kc::ChunkItem> chunk_items;
  std::vector<int32_t> window_ids, where;
  Upload up;

  // Empties everything for the next step.
  void Reset() {
    for (size_t r = 0; r < num_rounds; ++r) rounds[r].Reset();
    num_rounds = 0;
    pre_fold.clear();
    chunk_descs.clear();
    chunk_prep.clear();
    chunk_units.clear();
    chunk_items.clear();
    window_ids.clear();
    up.Clear();
  }
  // Round r of this step (created or reused).
  Round& RoundAt(size_t r) {
    if (rounds.size() <= r) rounds.resize(r + 1);
    num_rounds = std::max(num_rounds, r + 1);
    return rounds[r];
  }
};

// True if the streaming kernels may take this descriptor (kc::StepArgs::stream_begin).
bool StreamEligible(const kc::StepDesc& d) {
  return (d.flags & (kc::kFoldAfter | kc::kChunked)) == 0 && d.num_tokens <= kc::kStreamMaxTokens &&
         d.buffer_rows <= kc::kStreamMaxRows &&
         (d.num_tokens > 0 || (d.flags & kc::kFoldFirst) != 0);
}

// Lets the streaming fold kernel take a launch of fold-only descriptors when all are eligible.
void SetFoldOnlyStreaming(const std::vector<kc::StepDesc>& descs, kc::StepArgs* a) {
  int32_t rows = 0;
  for (const kc::StepDesc& d : descs) {
    if (!StreamEligible(d) || (d.flags & kc::kFoldFirst) == 0) return;
    rows = std::max(rows, d.buffer_rows);
  }
  a->stream_begin = 0;
  a->stream_fold_end = static_cast<int32_t>(descs.size());
  a->stream_max_tokens = 0;
  a->stream_max_rows = rows;
}

// Orders a round's descriptors as general | streaming with a fold | streaming without (prep
// units follow their descriptors) and records the boundaries for the launch.
void OrderForStreaming(Round* R, StepScratch* scratch) {
  auto rank = [](const kc::StepDesc& d) {
    if (!StreamEligible(d)) return 0;
    return (d.flags & kc::kFoldFirst) != 0 ? 1 : 2;
  };
  const size_t n = R->descs.size();
  // A stable partition into ranks 0 | 1 | 2 by counting (no temporary buffers).
  size_t count[3] = {0, 0, 0};
  for (const kc::StepDesc& d : R->descs) ++count[rank(d)];
  size_t next[3] = {0, count[0], count[0] + count[1]};
  std::vector<int32_t>& where = scratch->where;
  std::vector<kc::StepDesc>& sorted = scratch->sorted;
  where.resize(n);
  sorted.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int r = rank(R->descs[i]);
    const size_t at = next[r]++;
    sorted[at] = R->descs[i];
    where[i] = static_cast<int32_t>(at);
    if (r >= 1) {
      R->stream_max_tokens = std::max(R->stream_max_tokens, R->descs[i].num_tokens);
      R->stream_max_rows = std::max(R->stream_max_rows, R->descs[i].buffer_rows);
    }
  }
  for (kc::PrepUnit& u : R->units) u.item = where[u.item];
  R->descs.swap(sorted);  // both keep their memory for the next steps
  if (count[1] + count[2] > 0) {
    R->stream_begin = static_cast<int32_t>(count[0]);
    R->stream_fold_end = static_cast<int32_t>(count[0] + count[1]);
  }
}

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {}
  ~CudaBackend() override { Free(); }

  std::string Name() const override { return "cuda"; }

  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override;
  absl::Status RunLayerStep(const LayerStep& step) override;
  // RunLayerStep with device activations and outputs, ordered on `user` (see the header).
  absl::Status RunLayerStepOnDevice(const LayerStep& step, cudaStream_t user);
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override;
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override;
  absl::Status ResetConv(std::span<const int32_t> conv_slots) override;
  absl::Status ReadState(int32_t state_slot, int32_t layer, float* out) override;
  BackendMemory Memory() const override;
  // Page-locked memory: steps transfer activations from it and outputs into it directly.
  void* AllocateHostBuffer(size_t bytes) override;
  void FreeHostBuffer(void* p) override;
  bool PrefersHostBufferInputs() const override { return true; }
  // True: host steps download outputs with LayerStep::out_row_stride (not RunLayerStepOnDevice).
  bool TakesOutputRowStride() const override { return true; }
  // The phases of the RunLayerStep calls so far (CudaBackendOptions::profile).
  CudaStepProfile Profile() const {
    absl::MutexLock lock(&mu_);
    return profile_;
  }

 private:
  void Free();
  absl::Status CheckReady(int32_t layer) const;
  kc::LayerWeights Weights(int32_t layer) const;
  // Uploads `up` to d_in_ (through pinned staging) on the stream.
  absl::Status Send(const Upload& up);
  absl::Status Finish(const char* what);
  // Validates `step`, plans and launches it on stream_; with on_device, qkv/a/b/out are device
  // pointers used in place and nothing is copied back or synchronised.
  absl::Status StepLocked(const LayerStep& step, bool on_device);

  CudaBackendOptions options_;
  mutable absl::Mutex mu_;
  bool allocated_ = false;
  absl::Status hung_;  // set when a call's device work missed options_.sync_timeout
  ModelConfig config_;
  PoolSizes sizes_;
  PoolElementBytes bytes_;
  kc::Geometry geo_;
  kc::Pools pools_;
  cudaStream_t stream_ = nullptr;
  float* d_weights_ = nullptr;  // conv [L][ch][W], then A_log [L][HV], then dt_bias [L][HV]
  DeviceBuffer d_in_, d_out_, d_prep_, d_prep16_, d_chunk_, d_counters_;
  PinnedBuffer h_in_, h_out_;
  size_t counters_cap_ = 0;
  StepScratch scratch_;                // planning memory of StepLocked (under mu_)
  cudaEvent_t upload_done_ = nullptr;  // recorded after each upload out of h_in_
  bool upload_pending_ = false;        // upload_done_ was recorded and not yet waited on
  cudaEvent_t ev_start_ = nullptr, ev_end_ = nullptr;  // RunLayerStepOnDevice ordering
  // Profiling (options_.profile): events before the upload, after it, after the kernels and
  // after the download of a host step.
  cudaEvent_t prof_[4] = {};
  bool prof_step_ = false;    // the current step records them
  absl::Time prof_enqueued_;  // when the current step had enqueued everything
  CudaStepProfile profile_;
};

void CudaBackend::Free() {
  if (stream_ != nullptr) {
    cudaSetDevice(options_.device);
    cudaStreamSynchronize(stream_);
  }
  if (pools_.states != nullptr) cudaFree(pools_.states);
  if (pools_.pages != nullptr) cudaFree(pools_.pages);
  if (pools_.conv != nullptr) cudaFree(pools_.conv);
  if (d_weights_ != nullptr) cudaFree(d_weights_);
  pools_ = {};
  d_weights_ = nullptr;
  for (DeviceBuffer* b : {&d_in_, &d_out_, &d_prep_, &d_prep16_, &d_chunk_, &d_counters_}) {
    b->Release();
  }
  h_in_.Release();
  h_out_.Release();
  counters_cap_ = 0;
  for (cudaEvent_t* ev :
       {&upload_done_, &ev_start_, &ev_end_, &prof_[0], &prof_[1], &prof_[2], &prof_[3]}) {
    if (*ev != nullptr) cudaEventDestroy(*ev);
    *ev = nullptr;
  }
  profile_ = {};
  upload_pending_ = false;
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  stream_ = nullptr;
  allocated_ = false;
}

absl::Status CudaBackend::Allocate(const ModelConfig& config,
                                   const std::vector<LayerParams>& params, const PoolSizes& sizes) {
  absl::MutexLock lock(&mu_);
  if (std::string m = ValidateModelConfig(config); !m.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model: ", m));
  }
  if (config.head_v_dim % 4 != 0) {
    return absl::InvalidArgumentError("CudaBackend: head_v_dim must be a multiple of 4");
  }
  if (static_cast<int64_t>(params.size()) != config.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("params: expected ", config.num_layers, " layers, got ", params.size()));
  }
  for (size_t l = 0; l < params.size(); ++l) {
    const LayerParams& p = params[l];
    if (static_cast<int64_t>(p.conv_weight.size()) !=
            static_cast<int64_t>(config.channels()) * config.conv_width ||
        static_cast<int32_t>(p.a_log.size()) != config.num_v_heads ||
        static_cast<int32_t>(p.dt_bias.size()) != config.num_v_heads) {
      return absl::InvalidArgumentError(absl::StrCat("params[", l, "]: wrong sizes"));
    }
  }
  if (sizes.state_slots < 0 || sizes.buffer_pages < 0 || sizes.conv_slots < 0 ||
      sizes.page_tokens < 1 || sizes.max_drafts < 0) {
    return absl::InvalidArgumentError("pool sizes must be >= 0 and page_tokens >= 1");
  }
  if (!ValidDType(sizes.buffer_dtype) || !ValidDType(sizes.conv_dtype)) {
    return absl::InvalidArgumentError("buffer_dtype and conv_dtype must be FP32, FP16 or BF16");
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || options_.device >= count) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("CudaBackend: no CUDA device ", options_.device, " (", count, " visible)"));
  }
  Free();
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));
  const PoolElementBytes bytes = ComputePoolElementBytes(config, sizes);
  const size_t state_bytes = static_cast<size_t>(sizes.state_slots) * bytes.state_slot;
  const size_t page_bytes = static_cast<size_t>(sizes.buffer_pages) * bytes.buffer_page;
  const size_t conv_bytes = static_cast<size_t>(sizes.conv_slots) * bytes.conv_slot;
  size_t free_b = 0, total_b = 0;
  KVB_CUDA_RETURN(cudaMemGetInfo(&free_b, &total_b));
  if (state_bytes + page_bytes + conv_bytes > free_b) {
    return absl::ResourceExhaustedError(absl::StrCat("pools need ",
                                                     state_bytes + page_bytes + conv_bytes,
                                                     " bytes, the device has ", free_b, " free"));
  }
  auto alloc = [](void** p, size_t n) -> cudaError_t {
    if (n == 0) return cudaSuccess;
    cudaError_t e = cudaMalloc(p, n);
    if (e == cudaSuccess) e = cudaMemset(*p, 0, n);
    return e;
  };
  void *st = nullptr, *pg = nullptr, *cv = nullptr;
  cudaError_t e = alloc(&st, state_bytes);
  if (e == cudaSuccess) e = alloc(&pg, page_bytes);
  if (e == cudaSuccess) e = alloc(&cv, conv_bytes);
  pools_.states = static_cast<float*>(st);
  pools_.pages = static_cast<uint8_t*>(pg);
  pools_.conv = cv;
  if (e != cudaSuccess) {
    cudaGetLastError();
    Free();
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate device pools: ", cudaGetErrorString(e)));
  }
  KVB_CUDA_RETURN(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  for (cudaEvent_t* ev : {&upload_done_, &ev_start_, &ev_end_}) {
    KVB_CUDA_RETURN(cudaEventCreateWithFlags(ev, cudaEventDisableTiming));
  }
  if (options_.profile) {
    for (cudaEvent_t& ev : prof_) KVB_CUDA_RETURN(cudaEventCreate(&ev));
  }
  // Layer weights.
  const int32_t L = config.num_layers, ch = config.channels(), W = config.conv_width;
  const int32_t HV = config.num_v_heads;
  std::vector<float> w(static_cast<size_t>(L) * ch * W + 2 * static_cast<size_t>(L) * HV);
  for (int32_t l = 0; l < L; ++l) {
    std::copy(params[l].conv_weight.begin(), params[l].conv_weight.end(),
              w.begin() + static_cast<size_t>(l) * ch * W);
    std::copy(params[l].a_log.begin(), params[l].a_log.end(),
              w.begin() + static_cast<size_t>(L) * ch * W + static_cast<size_t>(l) * HV);
    std::copy(params[l].dt_bias.begin(), params[l].dt_bias.end(),
              w.begin() + static_cast<size_t>(L) * ch * W + static_cast<size_t>(L + l) * HV);
  }
  KVB_CUDA_RETURN(cudaMalloc(&d_weights_, w.size() * sizeof(float)));
  KVB_CUDA_RETURN(
      cudaMemcpy(d_weights_, w.data(), w.size() * sizeof(float), cudaMemcpyHostToDevice));
  config_ = config;
  sizes_ = sizes;
  bytes_ = bytes;
  geo_.H = config.num_k_heads;
  geo_.HV = HV;
  geo_.K = config.head_k_dim;
  geo_.V = config.head_v_dim;
  geo_.W = W;
  geo_.L = L;
  geo_.channels = ch;
  geo_.page_tokens = sizes.page_tokens;
  geo_.max_drafts = sizes.max_drafts;
  pools_.buffer_dtype = static_cast<int32_t>(sizes.buffer_dtype);
  pools_.conv_dtype = static_cast<int32_t>(sizes.conv_dtype);
  kc::ComputePageLayout(geo_, &pools_);
  if (pools_.page_bytes != bytes.buffer_page) {
    Free();
    return absl::InternalError("CudaBackend: page layout disagrees with ComputePoolElementBytes");
  }
  allocated_ = true;
  return absl::OkStatus();
}

kc::LayerWeights CudaBackend::Weights(int32_t layer) const {
  const size_t L = config_.num_layers, ch = config_.channels(), W = config_.conv_width;
  const size_t HV = config_.num_v_heads;
  kc::LayerWeights w;
  w.conv_w = d_weights_ + layer * ch * W;
  w.a_log = d_weights_ + L * ch * W + layer * HV;
  w.dt_bias = d_weights_ + L * ch * W + (L + layer) * HV;
  return w;
}

absl::Status CudaBackend::CheckReady(int32_t layer) const {
  if (!hung_.ok()) return hung_;
  if (!allocated_) return absl::FailedPreconditionError("CudaBackend: Allocate was not called");
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", config_.num_layers, ")"));
  }
  return absl::OkStatus();
}

void* CudaBackend::AllocateHostBuffer(size_t bytes) {
  if (cudaSetDevice(options_.device) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void CudaBackend::FreeHostBuffer(void* p) {
  if (p != nullptr) cudaFreeHost(p);
}

absl::Status CudaBackend::Send(const Upload& up) {
  if (up.size() == 0) return absl::OkStatus();
  if (upload_pending_) {
    // The previous upload may still be reading the pinned buffer (RunLayerStepOnDevice does not
    // synchronise): wait for it before the buffer is rewritten or reallocated.
    KVB_CUDA_RETURN(cudaEventSynchronize(upload_done_));
    upload_pending_ = false;
  }
  KVB_CUDA_RETURN(d_in_.Reserve(up.size()));
  if (up.staged_size() > 0) {
    KVB_CUDA_RETURN(h_in_.Reserve(up.staged_size()));
    up.CopyTo(static_cast<uint8_t*>(h_in_.ptr));
    KVB_CUDA_RETURN(
        cudaMemcpyAsync(d_in_.ptr, h_in_.ptr, up.staged_size(), cudaMemcpyHostToDevice, stream_));
  }
  KVB_CUDA_RETURN(up.ForEachDirectRun([&](size_t at, const void* src, size_t bytes) {
    return cudaMemcpyAsync(static_cast<uint8_t*>(d_in_.ptr) + at, src, bytes,
                           cudaMemcpyHostToDevice, stream_);
  }));
  KVB_CUDA_RETURN(cudaEventRecord(upload_done_, stream_));
  upload_pending_ = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::Finish(const char* what) {
  if (options_.sync_timeout == absl::InfiniteDuration()) {
    const cudaError_t e = cudaStreamSynchronize(stream_);
    if (e != cudaSuccess) return CudaError(e, what);
    return absl::OkStatus();
  }
  // Poll: spin for the first 2 ms (a step's usual wait), then sleep between queries.
  const absl::Time start = absl::Now();
  for (int i = 0;; ++i) {
    const cudaError_t e = cudaStreamQuery(stream_);
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) return CudaError(e, what);
    if ((i & 15) != 15) continue;
    const absl::Duration waited = absl::Now() - start;
    if (waited > options_.sync_timeout) {
      hung_ = absl::UnavailableError(absl::StrCat("GPU ", options_.device, " did not finish ", what,
                                                  " within ",
                                                  absl::FormatDuration(options_.sync_timeout),
                                                  "; this backend refuses every call from now on"));
      return hung_;
    }
    if (waited > absl::Milliseconds(2)) absl::SleepFor(absl::Microseconds(20));
  }
}

absl::Status CudaBackend::RunLayerStep(const LayerStep& step) {
  absl::MutexLock lock(&mu_);
  prof_step_ = options_.profile && prof_[0] != nullptr;
  const absl::Time start = prof_step_ ? absl::Now() : absl::InfinitePast();
  prof_enqueued_ = absl::InfinitePast();
  absl::Status s = StepLocked(step, false);
  if (prof_step_ && s.ok() && prof_enqueued_ != absl::InfinitePast()) {
    // Finish has run: every event has completed.
    float ms[3] = {0, 0, 0};
    for (int i = 0; i < 3; ++i) cudaEventElapsedTime(&ms[i], prof_[i], prof_[i + 1]);
    profile_.steps += 1;
    profile_.host_ms += absl::ToDoubleMilliseconds(prof_enqueued_ - start);
    profile_.wait_ms += absl::ToDoubleMilliseconds(absl::Now() - prof_enqueued_);
    profile_.upload_ms += ms[0];
    profile_.kernels_ms += ms[1];
    profile_.download_ms += ms[2];
  }
  prof_step_ = false;
  if (!s.ok() && stream_ != nullptr && hung_.ok()) {
    // Transfers may read the caller's (page-locked) activations or write its outputs until the
    // stream drains: none may outlive the call. (A hung device is not waited for: the call
    // must return, and the backend refuses everything from then on.)
    cudaStreamSynchronize(stream_);
    cudaGetLastError();
  }
  return s;
}

absl::Status CudaBackend::RunLayerStepOnDevice(const LayerStep& step, cudaStream_t user) {
  absl::MutexLock lock(&mu_);
  for (const void* p : {step.qkv, step.a, step.b, static_cast<const void*>(step.out)}) {
    if (reinterpret_cast<uintptr_t>(p) % 256 != 0) {
      return absl::InvalidArgumentError("RunLayerStepOnDevice: qkv, a, b, out must be 256-aligned");
    }
  }
  if (!allocated_) return absl::FailedPreconditionError("CudaBackend: Allocate was not called");
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));
  KVB_CUDA_RETURN(cudaEventRecord(ev_start_, user));
  KVB_CUDA_RETURN(cudaStreamWaitEvent(stream_, ev_start_, 0));
  absl::Status s = StepLocked(step, true);
  // Even after a failure, `user` must not run ahead of work already queued on stream_.
  KVB_CUDA_RETURN(cudaEventRecord(ev_end_, stream_));
  KVB_CUDA_RETURN(cudaStreamWaitEvent(user, ev_end_, 0));
  return s;
}

absl::Status CudaBackend::StepLocked(const LayerStep& step, bool on_device) {
  if (absl::Status s = CheckReady(step.layer); !s.ok()) return s;
  // Kernels write outputs densely; a row stride applies to the download of host steps.
  if (absl::Status s = ValidateLayerStep(config_, sizes_, step, /*takes_row_stride=*/!on_device);
      !s.ok()) {
    return s;
  }
  if (step.items.empty()) return absl::OkStatus();
  const bool tensor_core = options_.prefill == CudaPrefillMode::kTensorCore &&
                           kc::ChunkedPrefillSupported(geo_.K, geo_.V);
  for (size_t i = 0; i < step.items.size(); ++i) {
    if (step.kind == StepKind::kVerify && step.items[i].num_tokens > kc::kMaxStepTokens) {
      return absl::InvalidArgumentError(absl::StrCat("items[", i, "]: ", step.items[i].num_tokens,
                                                     " drafts exceed ", kc::kMaxStepTokens));
    }
  }
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));

  // Plan. Items in slices of <= kMaxStepTokens tokens through the buffered kernel (rounds), or,
  // for chunked items in tensor-core mode, through the UT kernels.
  const bool verify = step.kind == StepKind::kVerify;
  const int32_t S = kc::kMaxStepTokens;
  StepScratch& sc = scratch_;
  sc.Reset();
  auto add_slice = [&](size_t r, const kc::StepDesc& d) {
    Round& R = sc.RoundAt(r);
    kc::PrepUnit u;
    u.item = static_cast<int32_t>(R.descs.size());
    u.t_begin = 0;
    u.t_end = d.num_tokens;
    u.flags = verify ? kc::kStoreDrafts : kc::kInlineWindow;
    R.units.push_back(u);
    R.descs.push_back(d);
    R.max_tokens = std::max(R.max_tokens, d.num_tokens);
    if (d.flags & kc::kFoldFirst) {
      R.any_fold = true;
    } else {
      R.max_rows = std::max(R.max_rows, d.buffer_rows);
    }
  };
  std::vector<kc::StepDesc>& pre_fold = sc.pre_fold;
  std::vector<kc::StepDesc>& chunk_descs = sc.chunk_descs;
  std::vector<kc::PrepUnit>& chunk_prep = sc.chunk_prep;
  std::vector<kc::ChunkUnit>& chunk_units = sc.chunk_units;
  std::vector<kc::ChunkItem>& chunk_items = sc.chunk_items;
  std::vector<int32_t>& window_ids = sc.window_ids;
  for (const StepItem& it : step.items) {
    kc::StepDesc base;
    base.state_slot = it.state_slot;
    base.page_offset = it.page_offset;
    base.conv_slot = it.conv_slot;
    const int32_t first_flags =
        (it.fold_first ? kc::kFoldFirst : 0) | (it.state_is_new ? kc::kStateNew : 0);
    if (it.chunked && tensor_core) {
      if (it.fold_first || it.state_is_new) {
        kc::StepDesc f = base;
        f.num_tokens = 0;
        f.flags = first_flags;
        f.buffer_rows = it.buffer_rows;
        pre_fold.push_back(f);
      }
      kc::StepDesc d = base;
      d.token_offset = it.token_offset;
      d.num_tokens = it.num_tokens;
      d.fold_tokens = it.fold_tokens;
      const int32_t idx = static_cast<int32_t>(chunk_descs.size());
      chunk_descs.push_back(d);
      window_ids.push_back(idx);
      kc::ChunkItem ci;
      ci.item = idx;
      ci.unit_begin = static_cast<int32_t>(chunk_units.size());
      auto add_units = [&](int32_t begin, int32_t end, int32_t tail) {
        for (int32_t t = begin; t < end; t += kc::kChunk) {
          kc::ChunkUnit cu;
          cu.item = idx;
          cu.t_begin = t;
          cu.len = std::min(kc::kChunk, end - t);
          cu.tail = tail;
          chunk_units.push_back(cu);
          kc::PrepUnit pu;
          pu.item = idx;
          pu.t_begin = t;
          pu.t_end = t + cu.len;
          pu.flags = kc::kChunkMode;
          chunk_prep.push_back(pu);
        }
      };
      add_units(0, it.fold_tokens, 0);
      ci.unit_fold_end = static_cast<int32_t>(chunk_units.size());
      add_units(it.fold_tokens, it.num_tokens, 1);
      ci.unit_end = static_cast<int32_t>(chunk_units.size());
      chunk_items.push_back(ci);
      continue;
    }
    if (it.chunked) {
      // Exact chunked path: slices folded into the state at their end, then the tail as rows.
      const int32_t f = it.fold_tokens;
      size_t r = 0;
      bool first = true;
      for (int32_t t = 0; t < f; t += S, ++r) {
        kc::StepDesc d = base;
        d.token_offset = it.token_offset + t;
        d.num_tokens = std::min(S, f - t);
        d.flags = kc::kFoldAfter | (first ? first_flags : 0);
        d.buffer_rows = first ? it.buffer_rows : 0;
        add_slice(r, d);
        first = false;
      }
      for (int32_t t = f; t < it.num_tokens; t += S, ++r) {
        kc::StepDesc d = base;
        d.token_offset = it.token_offset + t;
        d.num_tokens = std::min(S, it.num_tokens - t);
        d.flags = first ? first_flags : 0;
        d.buffer_rows = first ? it.buffer_rows : t - f;
        add_slice(r, d);
        first = false;
      }
      continue;
    }
    const int32_t n_eff = it.fold_first ? 0 : it.buffer_rows;
    size_t r = 0;
    for (int32_t t = 0; t < it.num_tokens; t += S, ++r) {
      kc::StepDesc d = base;
      d.token_offset = it.token_offset + t;
      d.num_tokens = std::min(S, it.num_tokens - t);
      d.flags = (t == 0 ? first_flags : 0) | (verify ? kc::kVerify : 0);
      d.buffer_rows = t == 0 ? it.buffer_rows : n_eff + t;
      add_slice(r, d);
    }
  }

  // Upload: page table, descriptors, activations.
  const std::span<Round> rounds(sc.rounds.data(), sc.num_rounds);
  Upload& up = sc.up;
  const size_t pt_at = up.Add(step.page_table.data(), step.page_table.size());
  for (Round& R : rounds) {
    OrderForStreaming(&R, &sc);
    R.descs_at = up.Add(R.descs.data(), R.descs.size());
    R.units_at = up.Add(R.units.data(), R.units.size());
  }
  const size_t pre_at = up.Add(pre_fold.data(), pre_fold.size());
  const size_t cdesc_at = up.Add(chunk_descs.data(), chunk_descs.size());
  const size_t cprep_at = up.Add(chunk_prep.data(), chunk_prep.size());
  const size_t cunit_at = up.Add(chunk_units.data(), chunk_units.size());
  const size_t citem_at = up.Add(chunk_items.data(), chunk_items.size());
  const size_t win_at = up.Add(window_ids.data(), window_ids.size());
  const size_t T = static_cast<size_t>(step.total_tokens);
  const size_t in_es = DTypeSize(step.in_dtype);
  const size_t HV = geo_.HV, ch = geo_.channels;
  // Activations in page-locked memory (the engine stages them there) are transferred from where
  // they are; the caller's memory stays untouched until Finish.
  const bool direct =
      !on_device && IsPageLocked(step.qkv) && IsPageLocked(step.a) && IsPageLocked(step.b);
  const size_t qkv_at = on_device ? 0 : up.AddBytes(step.qkv, T * ch * in_es, direct);
  const size_t a_at = on_device ? 0 : up.AddBytes(step.a, T * HV * in_es, direct);
  const size_t b_at = on_device ? 0 : up.AddBytes(step.b, T * HV * in_es, direct);
  if (prof_step_) KVB_CUDA_RETURN(cudaEventRecord(prof_[0], stream_));
  if (absl::Status s = Send(up); !s.ok()) return s;
  if (prof_step_) KVB_CUDA_RETURN(cudaEventRecord(prof_[1], stream_));
  uint8_t* din = static_cast<uint8_t*>(d_in_.ptr);
  auto dptr = [din](size_t at) { return din + at; };
  const void* d_qkv = on_device ? step.qkv : dptr(qkv_at);
  const void* d_a = on_device ? step.a : dptr(a_at);
  const void* d_b = on_device ? step.b : dptr(b_at);

  // Scratch.
  const size_t HK = static_cast<size_t>(geo_.H) * geo_.K, HVV = HV * geo_.V;
  const size_t out_bytes = T * HVV * DTypeSize(step.out_dtype);
  if (!on_device) KVB_CUDA_RETURN(d_out_.Reserve(out_bytes));
  void* d_out = on_device ? step.out : d_out_.ptr;
  KVB_CUDA_RETURN(d_prep_.Reserve(T * (2 * HK + HVV + 2 * HV) * sizeof(float)));
  kc::Prepared prep;
  float* pf = static_cast<float*>(d_prep_.ptr);
  prep.q = pf;
  prep.k = prep.q + T * HK;
  prep.v = prep.k + T * HK;
  prep.G = prep.v + T * HVV;
  prep.beta = prep.G + T * HV;
  if (!chunk_units.empty()) {
    KVB_CUDA_RETURN(d_prep16_.Reserve(T * (2 * HK + HVV) * sizeof(uint16_t)));
    prep.qh = static_cast<uint16_t*>(d_prep16_.ptr);
    prep.kh = prep.qh + T * HK;
    prep.vh = prep.kh + T * HK;
  }
  size_t max_descs = pre_fold.size();
  for (const Round& R : rounds) max_descs = std::max(max_descs, R.descs.size());
  if (max_descs * geo_.H > counters_cap_) {
    const size_t want = std::max<size_t>(max_descs * geo_.H * 2, 1024);
    KVB_CUDA_RETURN(d_counters_.Reserve(want * sizeof(int32_t)));
    KVB_CUDA_RETURN(cudaMemsetAsync(d_counters_.ptr, 0, want * sizeof(int32_t), stream_));
    counters_cap_ = want;
  }

  const kc::LayerWeights weights = Weights(step.layer);
  const auto* page_table = reinterpret_cast<const int32_t*>(dptr(pt_at));
  kc::StepArgs sa;
  sa.g = geo_;
  sa.layer = step.layer;
  sa.page_table = page_table;
  sa.pools = pools_;
  sa.prep = prep;
  sa.out = d_out;
  sa.out_dtype = static_cast<int32_t>(step.out_dtype);
  sa.counters = static_cast<int32_t*>(d_counters_.ptr);
  kc::PrepArgs pa;
  pa.g = geo_;
  pa.layer = step.layer;
  pa.page_table = page_table;
  pa.pools = pools_;
  pa.w = weights;
  pa.qkv = d_qkv;
  pa.a = d_a;
  pa.b = d_b;
  pa.in_dtype = static_cast<int32_t>(step.in_dtype);
  pa.out = prep;

  // Tensor-core chunked items.
  if (!chunk_units.empty()) {
    const size_t units = chunk_units.size();
    const size_t w_elems = units * HV * kc::kChunk * geo_.K;
    const size_t u_elems = units * HV * kc::kChunk * geo_.V;
    const size_t p_elems = units * HV * kc::kChunk * kc::kChunk;
    KVB_CUDA_RETURN(d_chunk_.Reserve((w_elems + u_elems + p_elems) * sizeof(uint16_t)));
    if (!pre_fold.empty()) {
      kc::StepArgs f = sa;
      f.items = reinterpret_cast<const kc::StepDesc*>(dptr(pre_at));
      f.num_items = static_cast<int32_t>(pre_fold.size());
      f.max_tokens = 0;
      f.max_rows = 0;
      f.any_fold = true;
      SetFoldOnlyStreaming(pre_fold, &f);
      KVB_CUDA_RETURN(kc::LaunchBufferedStep(f, stream_));
    }
    kc::PrepArgs p = pa;
    p.items = reinterpret_cast<const kc::StepDesc*>(dptr(cdesc_at));
    p.units = reinterpret_cast<const kc::PrepUnit*>(dptr(cprep_at));
    p.num_units = static_cast<int32_t>(chunk_prep.size());
    p.chunk_only = true;
    KVB_CUDA_RETURN(kc::LaunchTokenPrep(p, stream_));
    kc::WindowAdvanceArgs wa;
    wa.g = geo_;
    wa.layer = step.layer;
    wa.items = p.items;
    wa.item_ids = reinterpret_cast<const int32_t*>(dptr(win_at));
    wa.num = static_cast<int32_t>(window_ids.size());
    wa.pools = pools_;
    wa.qkv = pa.qkv;
    wa.in_dtype = pa.in_dtype;
    KVB_CUDA_RETURN(kc::LaunchConvWindowAdvance(wa, stream_));
    kc::ChunkArgs ca;
    ca.g = geo_;
    ca.layer = step.layer;
    ca.items = p.items;
    ca.units = reinterpret_cast<const kc::ChunkUnit*>(dptr(cunit_at));
    ca.num_units = static_cast<int32_t>(units);
    ca.chunk_items = reinterpret_cast<const kc::ChunkItem*>(dptr(citem_at));
    ca.num_chunk_items = static_cast<int32_t>(chunk_items.size());
    ca.page_table = page_table;
    ca.pools = pools_;
    ca.prep = prep;
    ca.scratch.W = static_cast<uint16_t*>(d_chunk_.ptr);
    ca.scratch.U = ca.scratch.W + w_elems;
    ca.scratch.P = ca.scratch.U + u_elems;
    ca.out = d_out;
    ca.out_dtype = sa.out_dtype;
    KVB_CUDA_RETURN(kc::LaunchChunkedPrefill(ca, stream_));
  }

  // Buffered rounds.
  for (const Round& R : rounds) {
    kc::PrepArgs p = pa;
    p.items = reinterpret_cast<const kc::StepDesc*>(dptr(R.descs_at));
    p.units = reinterpret_cast<const kc::PrepUnit*>(dptr(R.units_at));
    p.num_units = static_cast<int32_t>(R.units.size());
    p.max_unit_tokens = R.max_tokens;
    KVB_CUDA_RETURN(kc::LaunchTokenPrep(p, stream_));
    kc::StepArgs s = sa;
    s.items = p.items;
    s.num_items = static_cast<int32_t>(R.descs.size());
    s.max_tokens = R.max_tokens;
    s.max_rows = R.max_rows;
    s.any_fold = R.any_fold;
    s.stream_begin = R.stream_begin;
    s.stream_fold_end = R.stream_fold_end;
    s.stream_max_tokens = R.stream_max_tokens;
    s.stream_max_rows = R.stream_max_rows;
    KVB_CUDA_RETURN(kc::LaunchBufferedStep(s, stream_));
  }

  if (on_device) return absl::OkStatus();
  if (prof_step_) KVB_CUDA_RETURN(cudaEventRecord(prof_[2], stream_));
  const bool direct_out = IsPageLocked(step.out);  // the engine's output buffers: no bounce copy
  const size_t row = T == 0 ? 0 : out_bytes / T;
  const size_t stride = step.out_row_stride == 0 ? row : step.out_row_stride;
  if (!direct_out) KVB_CUDA_RETURN(h_out_.Reserve(out_bytes));
  if (direct_out && stride != row) {
    // Rows land `stride` apart (e.g. one shard's heads within the full output).
    KVB_CUDA_RETURN(cudaMemcpy2DAsync(step.out, stride, d_out_.ptr, row, row, T,
                                      cudaMemcpyDeviceToHost, stream_));
  } else {
    KVB_CUDA_RETURN(cudaMemcpyAsync(direct_out ? step.out : h_out_.ptr, d_out_.ptr, out_bytes,
                                    cudaMemcpyDeviceToHost, stream_));
  }
  if (prof_step_) {
    KVB_CUDA_RETURN(cudaEventRecord(prof_[3], stream_));
    prof_enqueued_ = absl::Now();
  }
  if (absl::Status s = Finish("RunLayerStep"); !s.ok()) return s;
  if (direct_out) return absl::OkStatus();
  if (stride == row) {
    std::memcpy(step.out, h_out_.ptr, out_bytes);
  } else {
    for (size_t t = 0; t < T; ++t) {
      std::memcpy(static_cast<uint8_t*>(step.out) + t * stride,
                  static_cast<const uint8_t*>(h_out_.ptr) + t * row, row);
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                                      std::span<const int32_t> page_table) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckReady(layer); !s.ok()) return s;
  if (absl::Status s = ValidateFoldItems(config_, sizes_, layer, items, page_table); !s.ok()) {
    return s;
  }
  if (items.empty()) return absl::OkStatus();
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));
  std::vector<kc::StepDesc> descs;
  for (const FoldItem& it : items) {
    kc::StepDesc d;
    d.num_tokens = 0;
    d.state_slot = it.state_slot;
    d.flags = kc::kFoldFirst | (it.state_is_new ? kc::kStateNew : 0);
    d.buffer_rows = it.buffer_rows;
    d.page_offset = it.page_offset;
    descs.push_back(d);
  }
  Upload up;
  const size_t pt_at = up.Add(page_table.data(), page_table.size());
  const size_t d_at = up.Add(descs.data(), descs.size());
  if (absl::Status s = Send(up); !s.ok()) return s;
  if (descs.size() * geo_.H > counters_cap_) {
    const size_t want = std::max<size_t>(descs.size() * geo_.H * 2, 1024);
    KVB_CUDA_RETURN(d_counters_.Reserve(want * sizeof(int32_t)));
    KVB_CUDA_RETURN(cudaMemsetAsync(d_counters_.ptr, 0, want * sizeof(int32_t), stream_));
    counters_cap_ = want;
  }
  uint8_t* din = static_cast<uint8_t*>(d_in_.ptr);
  kc::StepArgs f;
  f.g = geo_;
  f.layer = layer;
  f.items = reinterpret_cast<const kc::StepDesc*>(din + d_at);
  f.num_items = static_cast<int32_t>(descs.size());
  f.page_table = reinterpret_cast<const int32_t*>(din + pt_at);
  f.pools = pools_;
  f.counters = static_cast<int32_t*>(d_counters_.ptr);
  f.any_fold = true;
  SetFoldOnlyStreaming(descs, &f);
  KVB_CUDA_RETURN(kc::LaunchBufferedStep(f, stream_));
  return Finish("FoldBuffers");
}

absl::Status CudaBackend::CommitConv(int32_t layer, std::span<const ConvCommitItem> items) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckReady(layer); !s.ok()) return s;
  if (absl::Status s = ValidateConvCommits(config_, sizes_, layer, items); !s.ok()) return s;
  if (items.empty()) return absl::OkStatus();
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));
  std::vector<int32_t> slots, accepted;
  for (const ConvCommitItem& it : items) {
    slots.push_back(it.conv_slot);
    accepted.push_back(it.accepted);
  }
  Upload up;
  const size_t s_at = up.Add(slots.data(), slots.size());
  const size_t a_at = up.Add(accepted.data(), accepted.size());
  if (absl::Status s = Send(up); !s.ok()) return s;
  uint8_t* din = static_cast<uint8_t*>(d_in_.ptr);
  KVB_CUDA_RETURN(kc::LaunchConvCommit(
      geo_, layer, pools_, reinterpret_cast<const int32_t*>(din + s_at),
      reinterpret_cast<const int32_t*>(din + a_at), static_cast<int32_t>(items.size()), stream_));
  return Finish("CommitConv");
}

absl::Status CudaBackend::ResetConv(std::span<const int32_t> conv_slots) {
  absl::MutexLock lock(&mu_);
  if (!hung_.ok()) return hung_;
  if (!allocated_) return absl::FailedPreconditionError("CudaBackend: Allocate was not called");
  if (absl::Status s = ValidateConvSlots(sizes_, conv_slots); !s.ok()) return s;
  if (conv_slots.empty()) return absl::OkStatus();
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));
  for (int32_t slot : conv_slots) {
    KVB_CUDA_RETURN(cudaMemsetAsync(
        static_cast<uint8_t*>(pools_.conv) + static_cast<size_t>(slot) * bytes_.conv_slot, 0,
        bytes_.conv_slot, stream_));
  }
  return Finish("ResetConv");
}

absl::Status CudaBackend::ReadState(int32_t state_slot, int32_t layer, float* out) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckReady(layer); !s.ok()) return s;
  if (absl::Status s = ValidateStateRead(config_, sizes_, state_slot, layer, out); !s.ok()) {
    return s;
  }
  KVB_CUDA_RETURN(cudaSetDevice(options_.device));
  const size_t n = static_cast<size_t>(config_.state_elems());
  const float* src =
      pools_.states + (static_cast<size_t>(state_slot) * config_.num_layers + layer) * n;
  KVB_CUDA_RETURN(cudaMemcpyAsync(out, src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  return Finish("ReadState");
}

BackendMemory CudaBackend::Memory() const {
  absl::MutexLock lock(&mu_);
  BackendMemory m;
  if (!allocated_) return m;
  m.pool_bytes = static_cast<int64_t>(sizes_.state_slots) * bytes_.state_slot +
                 static_cast<int64_t>(sizes_.buffer_pages) * bytes_.buffer_page +
                 static_cast<int64_t>(sizes_.conv_slots) * bytes_.conv_slot;
  size_t free_b = 0, total_b = 0;
  if (cudaSetDevice(options_.device) == cudaSuccess &&
      cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
    m.device_total_bytes = static_cast<int64_t>(total_b);
    m.device_free_bytes = static_cast<int64_t>(free_b);
  } else {
    cudaGetLastError();
  }
  return m;
}

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> MakeCudaBackend(int device) {
  CudaBackendOptions o;
  o.device = device;
  return MakeCudaBackend(o);
}

std::unique_ptr<Backend> MakeCudaBackend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

CudaStepProfile GetCudaStepProfile(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  return cuda == nullptr ? CudaStepProfile{} : cuda->Profile();
}

absl::Status RunLayerStepOnDevice(Backend& backend, const LayerStep& step, void* stream) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("RunLayerStepOnDevice needs a CUDA backend, got ", backend.Name()));
  }
  return cuda->RunLayerStepOnDevice(step, static_cast<cudaStream_t>(stream));
}

}  // namespace kvbuffer
