// Device helpers shared by the KVBuffer kernels: dtype loads/stores, reductions, pool addressing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/gdn_device.h"

namespace kvbuffer::cuda {

// Reads element `i` of a `dtype` array as float.
__device__ __forceinline__ float LoadElem(const void* p, int32_t dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t bits = static_cast<const uint16_t*>(p)[i];
  if (dtype == kBF16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  return __half2float(__ushort_as_half(bits));
}

// Writes `v` as element `i` of a `dtype` array (round to nearest even).
__device__ __forceinline__ void StoreElem(void* p, int32_t dtype, int64_t i, float v) {
  if (dtype == kF32) {
    static_cast<float*>(p)[i] = v;
  } else if (dtype == kBF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
}

// bf16 bits to float.
__device__ __forceinline__ float Bf16ToFloat(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// float to bf16 bits (round to nearest even).
__device__ __forceinline__ uint16_t FloatToBf16(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Two floats packed as bf16x2 (lo in the low half).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  return static_cast<uint32_t>(FloatToBf16(lo)) | (static_cast<uint32_t>(FloatToBf16(hi)) << 16);
}

// Sum over a warp.
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// SiLU.
__device__ __forceinline__ float Silu(float x) { return x / (1.0f + __expf(-x)); }

// Four consecutive elements (index i, a multiple of 4) of a `dtype` array as float4.
__device__ __forceinline__ float4 Load4(const void* p, int32_t dtype, int64_t i) {
  if (dtype == kF32) return *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
  const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i);
  if (dtype == kBF16) {
    return make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u),
                       __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u));
  }
  return make_float4(__half2float(__ushort_as_half(static_cast<uint16_t>(v.x & 0xffffu))),
                     __half2float(__ushort_as_half(static_cast<uint16_t>(v.x >> 16))),
                     __half2float(__ushort_as_half(static_cast<uint16_t>(v.y & 0xffffu))),
                     __half2float(__ushort_as_half(static_cast<uint16_t>(v.y >> 16))));
}

// Writes four consecutive elements (index i, a multiple of 4) of a `dtype` array.
__device__ __forceinline__ void Store4(void* p, int32_t dtype, int64_t i, float4 v) {
  if (dtype == kF32) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = v;
  } else if (dtype == kBF16) {
    const uint2 b = make_uint2(PackBf16(v.x, v.y), PackBf16(v.z, v.w));
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i) = b;
  } else {
    const uint32_t lo = static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v.x))) |
                        (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v.y))) << 16);
    const uint32_t hi = static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v.z))) |
                        (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v.w))) << 16);
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i) = make_uint2(lo, hi);
  }
}

// a += x * b, elementwise.
__device__ __forceinline__ void Axpy4(float4& a, float x, const float4& b) {
  a.x = fmaf(x, b.x, a.x);
  a.y = fmaf(x, b.y, a.y);
  a.z = fmaf(x, b.z, a.z);
  a.w = fmaf(x, b.w, a.w);
}

// a += b, elementwise.
__device__ __forceinline__ void Add4(float4& a, const float4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

// Initialises a shared-memory mbarrier expecting one arrival.
__device__ __forceinline__ void MbarInit(uint64_t* bar) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(a));
}

// Makes barrier initialisations visible to the bulk-copy (async) proxy.
__device__ __forceinline__ void MbarInitFence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
}

// Arrives on the barrier and announces `bytes` of bulk copies that will complete on it.
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, uint32_t bytes) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes)
               : "memory");
}

// Bulk copy (TMA engine) of `bytes` (multiple of 16, 16-byte aligned) global -> shared,
// completing on `bar`.
__device__ __forceinline__ void BulkCopy(void* smem_dst, const void* gmem_src, uint32_t bytes,
                                         uint64_t* bar) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(d),
      "l"(gmem_src), "r"(bytes), "r"(b)
      : "memory");
}

// Waits for phase `parity` of the barrier to complete.
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\n"
      "bra LAB_WAIT;\n"
      "DONE:\n"
      "}\n" ::"r"(a),
      "r"(parity)
      : "memory");
}

// 16-byte asynchronous global -> shared copy (cp.async, L2 only).
__device__ __forceinline__ void CpAsync16(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}

// 16-byte cp.async that copies `valid` bytes (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void CpAsync16Zfill(void* smem_dst, const void* gmem_src, int valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(valid));
}

// Waits until at most one committed cp.async group of this thread is still in flight.
__device__ __forceinline__ void CpAsyncWaitAllButOne() {
  asm volatile("cp.async.wait_group 1;\n" ::);
}

// Commits the cp.async copies issued so far as one group.
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until every committed cp.async group of this thread has landed.
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Base of one (page, layer) block of buffer rows for row `row` of a sequence; *slot gets the row
// inside the page.
__device__ __forceinline__ uint8_t* RowBlock(const Pools& p, const int32_t* page_table,
                                             int32_t page_offset, int32_t page_tokens,
                                             int32_t layer, int32_t row, int32_t* slot) {
  const int32_t page = page_table[page_offset + row / page_tokens];
  *slot = row % page_tokens;
  return p.pages + static_cast<int64_t>(page) * p.page_bytes +
         static_cast<int64_t>(layer) * p.block_bytes;
}

// Pointer to k^ of head h in a row block (element offset in the buffer dtype).
__device__ __forceinline__ void* RowK(const Pools& p, const Geometry& g, uint8_t* block,
                                      int32_t slot, int32_t h) {
  return block + (static_cast<int64_t>(slot) * g.H + h) * g.K * DTypeBytes(p.buffer_dtype);
}

// Pointer to u of value head hv in a row block.
__device__ __forceinline__ void* RowU(const Pools& p, const Geometry& g, uint8_t* block,
                                      int32_t slot, int32_t hv) {
  return block + p.u_offset +
         (static_cast<int64_t>(slot) * g.HV + hv) * g.V * DTypeBytes(p.buffer_dtype);
}

// Pointer to G of value head hv in a row block.
__device__ __forceinline__ float* RowG(const Pools& p, const Geometry& g, uint8_t* block,
                                       int32_t slot, int32_t hv) {
  return reinterpret_cast<float*>(block + p.g_offset) + static_cast<int64_t>(slot) * g.HV + hv;
}

// State of (slot, layer, hv): K x V fp32, row-major.
__device__ __forceinline__ float* StatePtr(const Pools& p, const Geometry& g, int32_t slot,
                                           int32_t layer, int32_t hv) {
  return p.states +
         ((static_cast<int64_t>(slot) * g.L + layer) * g.HV + hv) * static_cast<int64_t>(g.K) * g.V;
}

// Conv slot rows of (slot, layer): [W-1+max_drafts][channels] in the conv dtype.
__device__ __forceinline__ int64_t ConvBase(const Geometry& g, int32_t slot, int32_t layer) {
  return (static_cast<int64_t>(slot) * g.L + layer) * (g.W - 1 + g.max_drafts) * g.channels;
}

}  // namespace kvbuffer::cuda
