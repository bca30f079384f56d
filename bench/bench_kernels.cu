#include <cuda_bf16.h>

#include "bench/bench_kernels.h"

namespace kvbuffer::bench {
namespace {

__device__ __forceinline__ float HashUniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

__global__ void CopyKernel(const float4* __restrict__ src, float4* __restrict__ dst, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    __stcs(dst + i, __ldcs(src + i));
  }
}

__global__ void ReadKernel(const float4* __restrict__ src, size_t n, float* sink) {
  float acc = 0.f;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float4 v = __ldcs(src + i);
    acc += v.x + v.y + v.z + v.w;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0 && acc == 1234.5f) sink[blockIdx.x] = acc;  // keeps the loads
}

__global__ void FillKernel(void* p, int32_t dtype, size_t n, uint64_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float v = lo + (hi - lo) * HashUniform(seed, i);
    if (dtype == cuda::kF32) {
      static_cast<float*>(p)[i] = v;
    } else {
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
    }
  }
}

__global__ void InitPagesKernel(cuda::Geometry g, cuda::Pools pools, int32_t pages_per_seq,
                                uint64_t seed) {
  const int page = blockIdx.x;
  uint8_t* blk = pools.pages + static_cast<int64_t>(page) * pools.page_bytes;  // layer 0
  const int es = cuda::DTypeBytes(pools.buffer_dtype);
  const int64_t nk = static_cast<int64_t>(g.page_tokens) * g.H * g.K;
  const int64_t nu = static_cast<int64_t>(g.page_tokens) * g.HV * g.V;
  for (int64_t i = threadIdx.x; i < nk + nu; i += blockDim.x) {
    const float r = HashUniform(seed ^ (static_cast<uint64_t>(page) << 32), i);
    const float v = i < nk ? (r - 0.5f) * 0.2f : (r - 0.5f) * 2.0f;
    void* base = i < nk ? static_cast<void*>(blk) : static_cast<void*>(blk + pools.u_offset);
    const int64_t j = i < nk ? i : i - nk;
    if (pools.buffer_dtype == cuda::kF32) {
      static_cast<float*>(base)[j] = v;
    } else {
      static_cast<__nv_bfloat16*>(base)[j] = __float2bfloat16_rn(v);
    }
  }
  float* G = reinterpret_cast<float*>(blk + pools.g_offset);
  const int row0 = (page % pages_per_seq) * g.page_tokens;
  for (int i = threadIdx.x; i < g.page_tokens * g.HV; i += blockDim.x) {
    G[i] = -0.02f * static_cast<float>(row0 + i / g.HV + 1);
  }
}

__global__ void DelayKernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

}  // namespace

cudaError_t LaunchDelay(int us, cudaStream_t stream) {
  DelayKernel<<<1, 32, 0, stream>>>(static_cast<long long>(us) * 2000);
  return cudaGetLastError();
}

cudaError_t LaunchCopy(const float4* src, float4* dst, size_t n, cudaStream_t stream) {
  CopyKernel<<<132 * 16, 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

cudaError_t LaunchRead(const float4* src, size_t n, float* sink, cudaStream_t stream) {
  ReadKernel<<<132 * 16, 256, 0, stream>>>(src, n, sink);
  return cudaGetLastError();
}

cudaError_t LaunchFillUniform(float* p, size_t n, uint64_t seed, float lo, float hi,
                              cudaStream_t stream) {
  return LaunchFillUniformTyped(p, cuda::kF32, n, seed, lo, hi, stream);
}

cudaError_t LaunchFillUniformTyped(void* p, int32_t dtype, size_t n, uint64_t seed, float lo,
                                   float hi, cudaStream_t stream) {
  FillKernel<<<4096, 256, 0, stream>>>(p, dtype, n, seed, lo, hi);
  return cudaGetLastError();
}

cudaError_t LaunchInitPages(const cuda::Geometry& g, const cuda::Pools& pools, int32_t num_pages,
                            int32_t pages_per_seq, uint64_t seed, cudaStream_t stream) {
  if (num_pages == 0) return cudaSuccess;
  InitPagesKernel<<<num_pages, 256, 0, stream>>>(g, pools, pages_per_seq, seed);
  return cudaGetLastError();
}

}  // namespace kvbuffer::bench
