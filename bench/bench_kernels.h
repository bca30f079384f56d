// Device helpers of kvbuffer-bench: bandwidth probes and random initialisation of pools.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/gdn_device.h"

namespace kvbuffer::bench {

// dst[i] = src[i] over n float4 elements (a grid-stride copy).
cudaError_t LaunchCopy(const float4* src, float4* dst, size_t n, cudaStream_t stream);

// Reads n float4 elements and writes one partial sum per block into sink (read bandwidth).
cudaError_t LaunchRead(const float4* src, size_t n, float* sink, cudaStream_t stream);

// Spins for about `us` microseconds, so that the host can enqueue a timed region behind it.
cudaError_t LaunchDelay(int us, cudaStream_t stream);

// Fills n floats with uniform values in [lo, hi) drawn from a hash of (seed, index).
cudaError_t LaunchFillUniform(float* p, size_t n, uint64_t seed, float lo, float hi,
                              cudaStream_t stream);

// Fills n elements of `dtype` (kF32 or kBF16) with uniform values in [lo, hi).
cudaError_t LaunchFillUniformTyped(void* p, int32_t dtype, size_t n, uint64_t seed, float lo,
                                   float hi, cudaStream_t stream);

// Initialises every row of `num_pages` pages (layer 0 only is used by the bench): k^ and u
// random, G_r = -0.02 (r + 1) for page-local row r + row0 of the owning sequence.
cudaError_t LaunchInitPages(const cuda::Geometry& g, const cuda::Pools& pools, int32_t num_pages,
                            int32_t pages_per_seq, uint64_t seed, cudaStream_t stream);

}  // namespace kvbuffer::bench
