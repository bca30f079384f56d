// Helpers of the GPU tests: device detection and the skip macro.
#pragma once

#include <memory>

#include "gtest/gtest.h"
#include "service/engine/cuda/cuda_backend.h"

namespace kvbuffer::testing {

// True when a CUDA device is usable.
inline bool HaveGpu() { return CudaDeviceCount() > 0; }

// Factory for the engine suite: the exact CUDA backend on device 0, or nullptr (skip) without one.
inline std::unique_ptr<Backend> MakeCudaOrNull() {
  if (!HaveGpu()) return nullptr;
  return MakeCudaBackend(0);
}

}  // namespace kvbuffer::testing

#define KVB_REQUIRE_GPU()                                                                    \
  if (::kvbuffer::testing::HaveGpu()) {                                                      \
  } else                                                                                     \
    GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount failed or returned 0): GPU " \
                    "test skipped"
