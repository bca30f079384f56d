// CudaBackend: the Backend on one CUDA device, built on kernels/cuda. Same semantics as CpuBackend
// (service/engine/cpu_backend.h); no CUDA type appears in this header.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/time/time.h"
#include "service/engine/backend.h"

namespace kvbuffer {

// How chunked prefill items run on the device.
enum class CudaPrefillMode : uint8_t {
  // fp32 everywhere: chunked items are processed in slices of 16 tokens by the buffered kernel,
  // each slice folded into the state at its end. Matches the fp64 oracle to ~1e-6.
  kExact = 0,
  // UT form on tensor cores (bf16 operands, fp32 accumulation and state): the fast path for long
  // prompts; relative error against the oracle about 1e-2 (measured in bench/RESULTS.md).
  kTensorCore = 1,
};

// Settings of a CUDA backend.
struct CudaBackendOptions {
  int device = 0;
  CudaPrefillMode prefill = CudaPrefillMode::kExact;
  bool profile = false;  // time the phases of every RunLayerStep (GetCudaStepProfile)
  // A call whose device work has not finished after this long returns UNAVAILABLE, and so does
  // every later call (the device hangs; e.g. a tensor-parallel rank then breaks its group
  // instead of hanging the server). Infinite: wait as long as it takes.
  absl::Duration sync_timeout = absl::InfiniteDuration();
};

// Where the time of a CUDA backend's RunLayerStep calls went, summed over the calls since the
// backend was allocated (host activations in, host outputs back; CudaBackendOptions::profile).
struct CudaStepProfile {
  int64_t steps = 0;
  double host_ms = 0;      // host: from entry until everything is enqueued (checks, planning,
                           // staging copies, launches)
  double wait_ms = 0;      // host: waiting for the stream at the end
  double upload_ms = 0;    // device: the H2D transfers (metadata and activations)
  double kernels_ms = 0;   // device: from the end of the upload to the end of the last kernel
  double download_ms = 0;  // device: the D2H transfer of the outputs
};

// The profile of `backend` (all zero unless it is a CUDA backend with profiling on).
CudaStepProfile GetCudaStepProfile(Backend& backend);

// Number of usable CUDA devices; 0 when there is no device, driver or runtime.
int CudaDeviceCount();

// Creates a CUDA backend on `device` with exact prefill; Allocate fails if the device is missing.
std::unique_ptr<Backend> MakeCudaBackend(int device);

// Creates a CUDA backend with explicit options.
std::unique_ptr<Backend> MakeCudaBackend(const CudaBackendOptions& options);

#define KVB_CUDA_BACKEND_DEVICE_STEP 1
// Like RunLayerStep, but step.qkv/a/b/out are device pointers on the backend's GPU (256-byte
// aligned, same layouts/dtypes) and the work is ordered on `stream` (cudaStream_t): starts after
// work already on it; out is complete when `stream` reaches the return point. No host sync (launch
// errors only). items/page_table stay host spans. UNIMPLEMENTED if `backend` is not a CudaBackend.
absl::Status RunLayerStepOnDevice(Backend& backend, const LayerStep& step, void* stream);

}  // namespace kvbuffer
