#include "kernels/cuda/common.cuh"
#include "kernels/cuda/token_prep.h"

namespace kvbuffer::cuda {
namespace {

constexpr int kPrepThreads = 128;

// Raw qkv value of token `tau` (relative to the item start; negative: from the conv window).
__device__ __forceinline__ float RawAt(const Geometry& g, const Pools& pools, int64_t conv_base,
                                       const void* qkv, int32_t in_dtype, int32_t token_offset,
                                       int32_t tau, int32_t ch) {
  if (tau >= 0) {
    return LoadElem(qkv, in_dtype, static_cast<int64_t>(token_offset + tau) * g.channels + ch);
  }
  return LoadElem(pools.conv, pools.conv_dtype,
                  conv_base + static_cast<int64_t>(g.W - 1 + tau) * g.channels + ch);
}

// Writes the window after `m` tokens for channel ch: row j takes token m-(W-1)+j (in place safe:
// a row only reads a later row).
__device__ __forceinline__ void AdvanceWindow(const Geometry& g, const Pools& pools,
                                              int64_t conv_base, const void* qkv, int32_t in_dtype,
                                              int32_t token_offset, int32_t m, int32_t ch) {
  for (int j = 0; j < g.W - 1; ++j) {
    const int tau = m - (g.W - 1) + j;
    const float val = RawAt(g, pools, conv_base, qkv, in_dtype, token_offset, tau, ch);
    StoreElem(pools.conv, pools.conv_dtype, conv_base + static_cast<int64_t>(j) * g.channels + ch,
              val);
  }
}

// Gates of token `tok` and value head hv: writes beta = sigmoid(b) and returns
// g = -exp(A_log) * softplus(a + dt_bias) (softplus(x) = x for x > 20).
__device__ __forceinline__ float PrepGates(const PrepArgs& A, int64_t tok, int hv) {
  const int64_t i = tok * A.g.HV + hv;
  const float av = LoadElem(A.a, A.in_dtype, i) + A.w.dt_bias[hv];
  const float sp = av > 20.f ? av : log1pf(expf(av));
  const float bb = LoadElem(A.b, A.in_dtype, i);
  A.out.beta[i] = 1.f / (1.f + expf(-bb));
  return -expf(A.w.a_log[hv]) * sp;
}

__global__ void __launch_bounds__(kPrepThreads) TokenPrepKernel(PrepArgs A) {
  const Geometry g = A.g;
  const PrepUnit unit = A.units[blockIdx.x];
  const StepDesc it = A.items[unit.item];
  const int seg = blockIdx.y;
  const bool is_qk = seg < g.H;
  const int hv = seg - g.H;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t conv_base = ConvBase(g, it.conv_slot, A.layer);
  const bool chunk_mode = (unit.flags & kChunkMode) != 0;
  const int ngroups = is_qk ? 2 : 1;
  const int width = is_qk ? g.K : g.V;
  __shared__ float gsh[kChunk];

  for (int t = unit.t_begin + warp; t < unit.t_end; t += blockDim.x / 32) {
    const int64_t tok = it.token_offset + t;
    for (int gi = 0; gi < ngroups; ++gi) {
      const int cb =
          is_qk ? (gi == 0 ? seg * g.K : g.H * g.K + seg * g.K) : 2 * g.H * g.K + hv * g.V;
      float x[8];
      float sq = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int c = lane + 32 * e;
        x[e] = 0.f;
        if (c < width) {
          const int ch = cb + c;
          float acc = 0.f;
          for (int i = 0; i < g.W; ++i) {
            const float val = RawAt(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset,
                                    t - (g.W - 1) + i, ch);
            acc = fmaf(A.w.conv_w[static_cast<int64_t>(ch) * g.W + i], val, acc);
          }
          x[e] = Silu(acc);
          sq = fmaf(x[e], x[e], sq);
        }
      }
      float scale = 1.f;
      if (is_qk) {
        sq = WarpSum(sq);
        scale = rsqrtf(sq + 1e-6f);
        if (gi == 0) scale *= rsqrtf(static_cast<float>(g.K));
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int c = lane + 32 * e;
        if (c >= width) continue;
        const float val = x[e] * scale;
        if (is_qk) {
          const int64_t idx = (tok * g.H + seg) * g.K + c;
          if (chunk_mode) {
            (gi == 0 ? A.out.qh : A.out.kh)[idx] = FloatToBf16(val);
          } else {
            (gi == 0 ? A.out.q : A.out.k)[idx] = val;
          }
        } else {
          const int64_t idx = (tok * g.HV + hv) * g.V + c;
          if (chunk_mode) {
            A.out.vh[idx] = FloatToBf16(val);
          } else {
            A.out.v[idx] = val;
          }
        }
      }
    }
    if (!is_qk && lane == 0) {
      gsh[t - unit.t_begin] = PrepGates(A, tok, hv);
    }
  }
  __syncthreads();
  if (!is_qk && threadIdx.x == 0) {
    float G = 0.f;
    if (!chunk_mode && !(it.flags & kFoldFirst) && it.buffer_rows > 0) {
      int32_t slot;
      uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                              it.buffer_rows - 1, &slot);
      G = *RowG(A.pools, g, blk, slot, hv);
    }
    for (int t = unit.t_begin; t < unit.t_end; ++t) {
      G += gsh[t - unit.t_begin];
      A.out.G[(static_cast<int64_t>(it.token_offset) + t) * g.HV + hv] = G;
    }
  }
  if (unit.flags & (kInlineWindow | kStoreDrafts)) {
    // Every read of this block's window channels happened before the barrier above.
    const int m = unit.t_end - unit.t_begin;
    for (int gi = 0; gi < ngroups; ++gi) {
      const int cb =
          is_qk ? (gi == 0 ? seg * g.K : g.H * g.K + seg * g.K) : 2 * g.H * g.K + hv * g.V;
      for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const int ch = cb + c;
        if (unit.flags & kStoreDrafts) {
          for (int t = 0; t < m && t < g.max_drafts; ++t) {
            const float val = LoadElem(A.qkv, A.in_dtype,
                                       static_cast<int64_t>(it.token_offset + t) * g.channels + ch);
            StoreElem(A.pools.conv, A.pools.conv_dtype,
                      conv_base + static_cast<int64_t>(g.W - 1 + t) * g.channels + ch, val);
          }
        }
        if (unit.flags & kInlineWindow) {
          AdvanceWindow(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, m, ch);
        }
      }
    }
  }
}

__device__ __forceinline__ float4 Raw4(const Geometry& g, const Pools& pools, int64_t conv_base,
                                       const void* qkv, int32_t in_dtype, int32_t token_offset,
                                       int32_t tau, int32_t ch) {
  if (tau >= 0) {
    return Load4(qkv, in_dtype, static_cast<int64_t>(token_offset + tau) * g.channels + ch);
  }
  return Load4(pools.conv, pools.conv_dtype,
               conv_base + static_cast<int64_t>(g.W - 1 + tau) * g.channels + ch);
}

__device__ __forceinline__ float Conv4(const float4& w, float h3, float h2, float h1, float x) {
  return Silu(fmaf(w.x, h3, fmaf(w.y, h2, fmaf(w.z, h1, w.w * x))));
}

// Chunk-mode prep for conv width 4: each warp walks a contiguous run of tokens with the last three
// raw rows of its 4 channels per lane in registers (one vector load per token and channel group).
__global__ void __launch_bounds__(kPrepThreads, 8) ChunkPrepKernel(PrepArgs A) {
  const Geometry g = A.g;
  const PrepUnit unit = A.units[blockIdx.x];
  const StepDesc it = A.items[unit.item];
  const int seg = blockIdx.y;
  const bool is_qk = seg < g.H;
  const int hv = seg - g.H;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t conv_base = ConvBase(g, it.conv_slot, A.layer);
  const int n = unit.t_end - unit.t_begin;
  const int nwarps = blockDim.x / 32;
  const int per = (n + nwarps - 1) / nwarps;
  const int tb = unit.t_begin + warp * per, te = min(unit.t_end, tb + per);
  const int width = is_qk ? g.K : g.V;
  const int c = 4 * lane;
  const bool ok = c < width;
  __shared__ float gsh[kChunk];
  for (int gi = 0; gi < (is_qk ? 2 : 1); ++gi) {
    const int cb = is_qk ? (gi == 0 ? seg * g.K : g.H * g.K + seg * g.K) : 2 * g.H * g.K + hv * g.V;
    const int ch = cb + c;
    float4 w[4];
    float4 h1 = make_float4(0.f, 0.f, 0.f, 0.f), h2 = h1, h3 = h1;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[q] = ok ? *reinterpret_cast<const float4*>(A.w.conv_w + static_cast<int64_t>(ch + q) * 4)
                : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (ok && tb < te) {
      h1 = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, tb - 1, ch);
      h2 = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, tb - 2, ch);
      h3 = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, tb - 3, ch);
    }
    // The raw row of token t + 1 is requested before token t is computed.
    float4 xn = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok && tb < te) xn = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, tb, ch);
    for (int t = tb; t < te; ++t) {
      const float4 x = xn;
      if (ok && t + 1 < te) {
        xn = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, t + 1, ch);
      }
      float4 y;
      y.x = Conv4(w[0], h3.x, h2.x, h1.x, x.x);
      y.y = Conv4(w[1], h3.y, h2.y, h1.y, x.y);
      y.z = Conv4(w[2], h3.z, h2.z, h1.z, x.z);
      y.w = Conv4(w[3], h3.w, h2.w, h1.w, x.w);
      if (!ok) y = make_float4(0.f, 0.f, 0.f, 0.f);
      float scale = 1.f;
      if (is_qk) {
        const float sq = WarpSum(y.x * y.x + y.y * y.y + y.z * y.z + y.w * y.w);
        scale = rsqrtf(sq + 1e-6f);
        if (gi == 0) scale *= rsqrtf(static_cast<float>(g.K));
      }
      if (ok) {
        const uint2 packed =
            make_uint2(static_cast<uint32_t>(FloatToBf16(y.x * scale)) |
                           (static_cast<uint32_t>(FloatToBf16(y.y * scale)) << 16),
                       static_cast<uint32_t>(FloatToBf16(y.z * scale)) |
                           (static_cast<uint32_t>(FloatToBf16(y.w * scale)) << 16));
        const int64_t tok = it.token_offset + t;
        uint16_t* dst = is_qk ? (gi == 0 ? A.out.qh : A.out.kh) + (tok * g.H + seg) * g.K + c
                              : A.out.vh + (tok * g.HV + hv) * g.V + c;
        *reinterpret_cast<uint2*>(dst) = packed;
      }
      h3 = h2;
      h2 = h1;
      h1 = x;
    }
  }
  if (!is_qk) {
    for (int t = tb + lane; t < te; t += 32) {
      const int64_t tok = it.token_offset + t;
      gsh[t - unit.t_begin] = PrepGates(A, tok, hv);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float G = 0.f;
      for (int t = unit.t_begin; t < unit.t_end; ++t) {
        G += gsh[t - unit.t_begin];
        A.out.G[(static_cast<int64_t>(it.token_offset) + t) * g.HV + hv] = G;
      }
    }
  }
}

// One-token units (decode, or a verify of one draft) for conv width 4 and K, V <= 128: one warp
// per (unit, head), lane -> 4 channels of q and k (or of v). Every load (three window rows, the new
// raw row, the conv weights) is issued up front, and the window moves in the same thread that
// read it (kInlineWindow units are whole items), so no barrier and no second read.
__global__ void __launch_bounds__(32) DecodePrepKernel(PrepArgs A) {
  const Geometry g = A.g;
  const PrepUnit unit = A.units[blockIdx.x];
  const StepDesc it = A.items[unit.item];
  const int seg = blockIdx.y;
  const bool is_qk = seg < g.H;
  const int hv = seg - g.H;
  const int lane = threadIdx.x;
  const int64_t conv_base = ConvBase(g, it.conv_slot, A.layer);
  const int width = is_qk ? g.K : g.V;
  const int c = 4 * lane;
  const bool ok = c < width;
  const int64_t tok = it.token_offset + unit.t_begin;
  const bool advance = (unit.flags & kInlineWindow) != 0;
  const bool drafts = (unit.flags & kStoreDrafts) != 0 && g.max_drafts > 0;
  // Group 0: q (or v), group 1: k.
  float4 w[2][4], h1[2], h2[2], h3[2], x[2];
  int ch[2];
#pragma unroll
  for (int gi = 0; gi < 2; ++gi) {
    ch[gi] =
        is_qk ? (gi == 0 ? seg * g.K : g.H * g.K + seg * g.K) + c : 2 * g.H * g.K + hv * g.V + c;
    const bool live = ok && (gi == 0 || is_qk);
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    h1[gi] = h2[gi] = h3[gi] = x[gi] = z;
#pragma unroll
    for (int q = 0; q < 4; ++q) w[gi][q] = z;
    if (!live) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[gi][q] =
          *reinterpret_cast<const float4*>(A.w.conv_w + static_cast<int64_t>(ch[gi] + q) * 4);
    }
    const int t = unit.t_begin;
    h3[gi] = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, t - 3, ch[gi]);
    h2[gi] = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, t - 2, ch[gi]);
    h1[gi] = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, t - 1, ch[gi]);
    x[gi] = Raw4(g, A.pools, conv_base, A.qkv, A.in_dtype, it.token_offset, t, ch[gi]);
  }
#pragma unroll
  for (int gi = 0; gi < 2; ++gi) {
    if (gi == 1 && !is_qk) break;
    float4 y;
    y.x = Conv4(w[gi][0], h3[gi].x, h2[gi].x, h1[gi].x, x[gi].x);
    y.y = Conv4(w[gi][1], h3[gi].y, h2[gi].y, h1[gi].y, x[gi].y);
    y.z = Conv4(w[gi][2], h3[gi].z, h2[gi].z, h1[gi].z, x[gi].z);
    y.w = Conv4(w[gi][3], h3[gi].w, h2[gi].w, h1[gi].w, x[gi].w);
    if (!ok) y = make_float4(0.f, 0.f, 0.f, 0.f);
    float scale = 1.f;
    if (is_qk) {
      const float sq = WarpSum(y.x * y.x + y.y * y.y + y.z * y.z + y.w * y.w);
      scale = rsqrtf(sq + 1e-6f);
      if (gi == 0) scale *= rsqrtf(static_cast<float>(g.K));
    }
    if (!ok) continue;
    y.x *= scale;
    y.y *= scale;
    y.z *= scale;
    y.w *= scale;
    float* dst = is_qk ? (gi == 0 ? A.out.q : A.out.k) + (tok * g.H + seg) * g.K + c
                       : A.out.v + (tok * g.HV + hv) * g.V + c;
    *reinterpret_cast<float4*>(dst) = y;
    if (advance) {
      Store4(A.pools.conv, A.pools.conv_dtype, conv_base + ch[gi], h2[gi]);
      Store4(A.pools.conv, A.pools.conv_dtype, conv_base + g.channels + ch[gi], h1[gi]);
      Store4(A.pools.conv, A.pools.conv_dtype, conv_base + 2 * g.channels + ch[gi], x[gi]);
    }
    if (drafts) {
      Store4(A.pools.conv, A.pools.conv_dtype, conv_base + 3 * g.channels + ch[gi], x[gi]);
    }
  }
  if (!is_qk && lane == 0) {
    const float gg = PrepGates(A, tok, hv);
    float G = 0.f;
    if (!(it.flags & kFoldFirst) && it.buffer_rows > 0) {
      int32_t slot;
      uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                              it.buffer_rows - 1, &slot);
      G = *RowG(A.pools, g, blk, slot, hv);
    }
    A.out.G[tok * g.HV + hv] = G + gg;
  }
}

__global__ void WindowAdvanceKernel(WindowAdvanceArgs A) {
  const int ch = blockIdx.y * blockDim.x + threadIdx.x;
  if (ch >= A.g.channels) return;
  const StepDesc it = A.items[A.item_ids[blockIdx.x]];
  AdvanceWindow(A.g, A.pools, ConvBase(A.g, it.conv_slot, A.layer), A.qkv, A.in_dtype,
                it.token_offset, it.num_tokens, ch);
}

__global__ void ConvCommitKernel(Geometry g, int32_t layer, Pools pools, const int32_t* slots,
                                 const int32_t* accepted) {
  const int ch = blockIdx.y * blockDim.x + threadIdx.x;
  if (ch >= g.channels) return;
  const int a = accepted[blockIdx.x];
  if (a <= 0) return;
  const int64_t base = ConvBase(g, slots[blockIdx.x], layer);
  for (int j = 0; j < g.W - 1; ++j) {
    const float val = LoadElem(pools.conv, pools.conv_dtype,
                               base + static_cast<int64_t>(a + j) * g.channels + ch);
    StoreElem(pools.conv, pools.conv_dtype, base + static_cast<int64_t>(j) * g.channels + ch, val);
  }
}

}  // namespace

cudaError_t LaunchTokenPrep(const PrepArgs& args, cudaStream_t stream) {
  if (args.num_units == 0) return cudaSuccess;
  if (args.g.K > 256 || args.g.V > 256) return cudaErrorInvalidValue;
  dim3 grid(args.num_units, args.g.H + args.g.HV);
  if (args.chunk_only && args.g.W == 4 && args.g.K <= 128 && args.g.V <= 128 && args.g.K % 4 == 0 &&
      args.g.V % 4 == 0) {
    ChunkPrepKernel<<<grid, kPrepThreads, 0, stream>>>(args);
  } else if (args.max_unit_tokens == 1 && args.g.W == 4 && args.g.K <= 128 && args.g.V <= 128 &&
             args.g.K % 4 == 0 && args.g.V % 4 == 0 && args.g.channels % 4 == 0) {
    DecodePrepKernel<<<grid, 32, 0, stream>>>(args);
  } else {
    // One token per unit (decode): one warp per block, so idle warps hold no SM slots.
    const int threads = args.max_unit_tokens == 1 ? 32 : kPrepThreads;
    TokenPrepKernel<<<grid, threads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

cudaError_t LaunchConvWindowAdvance(const WindowAdvanceArgs& args, cudaStream_t stream) {
  if (args.num == 0 || args.g.W <= 1) return cudaSuccess;
  dim3 grid(args.num, (args.g.channels + 255) / 256);
  WindowAdvanceKernel<<<grid, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t LaunchConvCommit(const Geometry& g, int32_t layer, const Pools& pools,
                             const int32_t* slots, const int32_t* accepted, int32_t num,
                             cudaStream_t stream) {
  if (num == 0 || g.W <= 1) return cudaSuccess;
  dim3 grid(num, (g.channels + 255) / 256);
  ConvCommitKernel<<<grid, 256, 0, stream>>>(g, layer, pools, slots, accepted);
  return cudaGetLastError();
}

}  // namespace kvbuffer::cuda
