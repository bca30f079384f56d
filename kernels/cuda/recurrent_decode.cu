#include "kernels/cuda/common.cuh"
#include "kernels/cuda/recurrent_decode.h"

namespace kvbuffer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBV = 32;
constexpr int kRowGroups = 16;

template <int R>
__global__ void __launch_bounds__(kThreads) RecurrentKernel(RecurrentArgs A) {
  const Geometry& g = A.g;
  const int b = blockIdx.x;
  const int nvt = (g.V + kBV - 1) / kBV;
  const int hv = blockIdx.y / nvt, vt = blockIdx.y % nvt;
  const int h = hv / (g.HV / g.H);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = tid >> 3, c4 = tid & 7;
  const int K = g.K, V = g.V;
  const int col0 = vt * kBV + c4 * 4;
  const bool col_ok = col0 < V;
  __shared__ float qs[256], ks[256];
  __shared__ __align__(16) float red[2][4][kBV];
  __shared__ __align__(16) float us[kBV];
  __shared__ float kq_sh;

  float* S = StatePtr(A.pools, g, A.slots[b], A.layer, hv);
  float4 s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int k = rg + kRowGroups * r;
    s[r] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (col_ok && k < K) {
      s[r] = __ldcs(reinterpret_cast<const float4*>(S + static_cast<int64_t>(k) * V + col0));
    }
  }
  for (int c = tid; c < K; c += kThreads) {
    const int64_t src = (static_cast<int64_t>(b) * g.H + h) * K + c;
    qs[c] = A.prep.q[src];
    ks[c] = A.prep.k[src];
  }
  const float eg = expf(A.prep.G[static_cast<int64_t>(b) * g.HV + hv]);
  __syncthreads();
  if (warp == 0) {
    float d = 0.f;
    for (int c = lane; c < K; c += 32) d = fmaf(ks[c], qs[c], d);
    d = WarpSum(d);
    if (lane == 0) kq_sh = d;
  }
  float4 pq = make_float4(0.f, 0.f, 0.f, 0.f), pk = pq;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int k = rg + kRowGroups * r;
    s[r].x *= eg;
    s[r].y *= eg;
    s[r].z *= eg;
    s[r].w *= eg;
    if (k < K) {
      const float qv = qs[k], kv = ks[k];
      pq.x = fmaf(s[r].x, qv, pq.x);
      pq.y = fmaf(s[r].y, qv, pq.y);
      pq.z = fmaf(s[r].z, qv, pq.z);
      pq.w = fmaf(s[r].w, qv, pq.w);
      pk.x = fmaf(s[r].x, kv, pk.x);
      pk.y = fmaf(s[r].y, kv, pk.y);
      pk.z = fmaf(s[r].z, kv, pk.z);
      pk.w = fmaf(s[r].w, kv, pk.w);
    }
  }
#pragma unroll
  for (int o = 8; o <= 16; o <<= 1) {
    pq.x += __shfl_xor_sync(0xffffffffu, pq.x, o);
    pq.y += __shfl_xor_sync(0xffffffffu, pq.y, o);
    pq.z += __shfl_xor_sync(0xffffffffu, pq.z, o);
    pq.w += __shfl_xor_sync(0xffffffffu, pq.w, o);
    pk.x += __shfl_xor_sync(0xffffffffu, pk.x, o);
    pk.y += __shfl_xor_sync(0xffffffffu, pk.y, o);
    pk.z += __shfl_xor_sync(0xffffffffu, pk.z, o);
    pk.w += __shfl_xor_sync(0xffffffffu, pk.w, o);
  }
  if (lane < 8) {
    *reinterpret_cast<float4*>(&red[0][warp][c4 * 4]) = pq;
    *reinterpret_cast<float4*>(&red[1][warp][c4 * 4]) = pk;
  }
  __syncthreads();
  if (tid < kBV) {
    const int col = vt * kBV + tid;
    float u = 0.f;
    if (col < V) {
      const float p = red[0][0][tid] + red[0][1][tid] + red[0][2][tid] + red[0][3][tid];
      const float y = red[1][0][tid] + red[1][1][tid] + red[1][2][tid] + red[1][3][tid];
      const int64_t t = static_cast<int64_t>(b) * g.HV + hv;
      u = A.prep.beta[t] * (A.prep.v[t * V + col] - y);
      StoreElem(A.out, A.out_dtype, t * V + col, fmaf(kq_sh, u, p));
    }
    us[tid] = u;
  }
  __syncthreads();
  const float4 u4 = *reinterpret_cast<const float4*>(&us[c4 * 4]);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int k = rg + kRowGroups * r;
    if (col_ok && k < K) {
      const float kv = ks[k];
      float4 v = s[r];
      v.x = fmaf(kv, u4.x, v.x);
      v.y = fmaf(kv, u4.y, v.y);
      v.z = fmaf(kv, u4.z, v.z);
      v.w = fmaf(kv, u4.w, v.w);
      __stcs(reinterpret_cast<float4*>(S + static_cast<int64_t>(k) * V + col0), v);
    }
  }
}

// Whole (slot, value head) state staged in shared memory by cp.async; one thread per column.
__global__ void __launch_bounds__(kThreads) RecurrentTileKernel(RecurrentArgs A) {
  const Geometry& g = A.g;
  const int b = blockIdx.x, hv = blockIdx.y;
  const int h = hv / (g.HV / g.H);
  const int tid = threadIdx.x, c = tid;
  const int K = g.K, V = g.V;
  extern __shared__ __align__(128) float St[];
  float* qs = St + K * V;
  float* ks = qs + K;
  float* S = StatePtr(A.pools, g, A.slots[b], A.layer, hv);
  for (int i = tid; i < K * V / 4; i += kThreads) CpAsync16(St + 4 * i, S + 4 * i);
  CpAsyncCommit();
  for (int k = tid; k < K; k += kThreads) {
    const int64_t src = (static_cast<int64_t>(b) * g.H + h) * K + k;
    qs[k] = A.prep.q[src];
    ks[k] = A.prep.k[src];
  }
  const int64_t t = static_cast<int64_t>(b) * g.HV + hv;
  const float eg = expf(A.prep.G[t]);
  const float beta = A.prep.beta[t];
  const float vv = c < V ? A.prep.v[t * V + c] : 0.f;
  __syncthreads();
  float kq = 0.f;
  for (int k = 0; k < K; ++k) kq = fmaf(ks[k], qs[k], kq);
  CpAsyncWaitAll();
  __syncthreads();
  if (c >= V) return;
  float p = 0.f, y = 0.f;
  for (int k = 0; k < K; ++k) {
    const float s = St[k * V + c];
    p = fmaf(s, qs[k], p);
    y = fmaf(s, ks[k], y);
  }
  const float u = beta * (vv - eg * y);
  StoreElem(A.out, A.out_dtype, t * V + c, fmaf(kq, u, eg * p));
  for (int k = 0; k < K; ++k) {
    __stcs(S + static_cast<int64_t>(k) * V + c, fmaf(ks[k], u, eg * St[k * V + c]));
  }
}

template <int R>
cudaError_t Launch(const RecurrentArgs& args, cudaStream_t stream) {
  const int nvt = (args.g.V + kBV - 1) / kBV;
  dim3 grid(args.batch, args.g.HV * nvt);
  RecurrentKernel<R><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRecurrentDecode(const RecurrentArgs& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.g.K > 256 || args.g.V % 4 != 0) return cudaErrorInvalidValue;
  const size_t tile = (static_cast<size_t>(args.g.K) * args.g.V + 2 * args.g.K) * sizeof(float);
  if (args.variant != 1 && args.g.V <= kThreads && tile <= 160 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(
        RecurrentTileKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(tile));
    if (e != cudaSuccess) return e;
    dim3 grid(args.batch, args.g.HV);
    RecurrentTileKernel<<<grid, kThreads, tile, stream>>>(args);
    return cudaGetLastError();
  }
  const int r = (args.g.K + kRowGroups - 1) / kRowGroups;
  if (r <= 1) return Launch<1>(args, stream);
  if (r <= 2) return Launch<2>(args, stream);
  if (r <= 4) return Launch<4>(args, stream);
  if (r <= 8) return Launch<8>(args, stream);
  return Launch<16>(args, stream);
}

}  // namespace kvbuffer::cuda
