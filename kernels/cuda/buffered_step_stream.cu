// Streaming buffered step for K = V = 128 items of 0..kStreamMaxTokens tokens (a fold of the
// buffer first, or none): one small block per (item, value head, column tile). Each thread holds
// its share of the state tile in registers (one streaming load per 16 bytes, issued right after the
// descriptor), while the buffer rows and tokens arrive in shared memory by cp.async; nothing waits
// on a block-wide copy and a block is short, so many blocks per SM keep the DRAM busy while others
// finish their dependent chain (descriptor -> page table -> rows -> dot products -> outputs). A
// fold is a rank-n update of the register tile, written back once. The fold_first race is handled
// as in buffered_step.cu: rows are in shared memory before any new row is written; u tiles are
// private to a block, and the shared k^/G rows are written by the last block of the (item, key
// head) to have staged its rows (an arrival counter). See bench/NOTES.md (v7).
#include <cstdint>

#include "kernels/cuda/buffered_step_internal.h"
#include "kernels/cuda/common.cuh"

namespace kvbuffer::cuda {
namespace {

constexpr int kK = 128, kV = 128;

// Shared memory of one block (bytes, 16-byte aligned regions).
struct StreamSmem {
  int qs, ks, vs, gi, bi, krow, urow, grow, rnew, red, rrd, ckk, ckq, total;
};

__host__ __device__ inline StreamSmem MakeStreamSmem(int M, int TC, int NT, int nrows, int es) {
  StreamSmem s;
  int o = 0;
  auto take = [&o](int bytes) {
    const int at = o;
    o += (bytes + 15) & ~15;
    return at;
  };
  const int nw = NT / 32;
  s.qs = take(M * kK * 4);
  s.ks = take(M * kK * 4);
  s.vs = take(M * TC * 4);
  s.gi = take(M * 4);
  s.bi = take(M * 4);
  s.krow = take(nrows * kK * es);
  s.urow = take(nrows * TC * es);
  s.grow = take(nrows * 4);
  s.rnew = take(M * 8);
  s.red = take(nw * 2 * M * TC * 4);
  s.rrd = take(nw * 2 * M * TC * 4);
  s.ckk = take(M * M * 4);
  s.ckq = take(M * M * 4 + 16);  // + the writer flag
  s.total = o;
  return s;
}

// 4-byte asynchronous global -> shared copy.
__device__ __forceinline__ void CpAsync4(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src));
}

// 16-byte streaming load that asks L2 to fetch the surrounding 256 bytes (the neighbouring
// column tiles of the same rows are read by the next blocks).
__device__ __forceinline__ float4 LoadStream256(const float* p) {
  float4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float Dot4(const float4& a, const float4& b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

__device__ __forceinline__ float4 Shfl4(const float4& v, int off) {
  return make_float4(__shfl_xor_sync(0xffffffffu, v.x, off), __shfl_xor_sync(0xffffffffu, v.y, off),
                     __shfl_xor_sync(0xffffffffu, v.z, off),
                     __shfl_xor_sync(0xffffffffu, v.w, off));
}

// Threads of a block with TC columns and RPT state rows per thread.
__host__ __device__ constexpr int StreamThreads(int TC, int RPT) { return kK * TC / (4 * RPT); }

// Blocks per SM the register budget aims at: 64 or 80 registers per thread with 8 state rows,
// 96 or 128 with 16 (more for drafts); whole-head blocks always two per SM.
__host__ __device__ constexpr int StreamMinBlocks(int M, int TC, int RPT, bool fold) {
  const bool light = true;  // per-token accumulators: drafts need no more registers
  const int regs = RPT == 8 ? (light ? 64 : 80) : (light ? 96 : 128);
  const int b = 65536 / (StreamThreads(TC, RPT) * regs);
  return StreamThreads(TC, RPT) >= 512 ? 2 : (b < 1 ? 1 : b);
}

// M: most tokens per item (template bound), TC: columns per block (32, 64 or 128), RPT: state
// rows per thread (8 or 16), kFold: the items fold their buffer first.
template <int M, int TC, int RPT, bool kFold>
__global__ void __launch_bounds__(StreamThreads(TC, RPT), StreamMinBlocks(M, TC, RPT, kFold))
    StreamKernel(StepArgs A, int32_t first) {
  // CG lanes cover one row of the tile; thread rows are rg RPT .. rg RPT + RPT - 1 (contiguous, so
  // the token and k^ values of a thread's rows are float4 loads from shared memory).
  constexpr int NT = StreamThreads(TC, RPT), NW = NT / 32, CG = TC / 4;
  constexpr int kTiles = kV / TC;
  extern __shared__ __align__(16) uint8_t smem[];
  const Geometry& g = A.g;
  // Tiles of one item are neighbours in launch order, so co-resident blocks read whole states.
  const int item = first + static_cast<int>(blockIdx.y);
  const int hv = blockIdx.x / kTiles, tile = blockIdx.x % kTiles;
  const int group = g.HV / g.H, h = hv / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cg = tid % CG, rg = tid / CG;  // column group (4 columns) and row group
  const int col0 = tile * TC;

  const StepDesc it = A.items[item];
  const int m = it.num_tokens, n = it.buffer_rows;
  const bool has_state = it.state_slot >= 0;
  const bool is_new = (it.flags & kStateNew) != 0;
  const bool load_state = has_state && !is_new;
  const bool fold = kFold && has_state && n > 0;  // kFold items all carry kFoldFirst
  const int n_eff = kFold ? 0 : n;                // rows the tokens combine with
  const int bdt = A.pools.buffer_dtype, es = DTypeBytes(bdt);

  // 1. The state tile straight into registers: 8 streaming 16-byte loads per thread.
  float* S = has_state ? StatePtr(A.pools, g, it.state_slot, A.layer, hv) + col0 : nullptr;
  float4 s[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    s[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (load_state) {
      const float* sp = S + (rg * RPT + i) * kV + 4 * cg;
      s[i] = A.variant == 9 ? LoadStream256(sp) : __ldcs(reinterpret_cast<const float4*>(sp));
    }
  }

  const StreamSmem L = MakeStreamSmem(M, TC, NT, A.max_rows, es);
  float* qs = reinterpret_cast<float*>(smem + L.qs);
  float* ks = reinterpret_cast<float*>(smem + L.ks);
  float* vs = reinterpret_cast<float*>(smem + L.vs);
  float* Gi = reinterpret_cast<float*>(smem + L.gi);
  float* bi = reinterpret_cast<float*>(smem + L.bi);
  uint8_t* krow = smem + L.krow;
  uint8_t* urow = smem + L.urow;
  float* grow = reinterpret_cast<float*>(smem + L.grow);
  uint8_t** rnew = reinterpret_cast<uint8_t**>(smem + L.rnew);
  float* red = reinterpret_cast<float*>(smem + L.red);
  float* rrd = reinterpret_cast<float*>(smem + L.rrd);
  float* ckk = reinterpret_cast<float*>(smem + L.ckk);
  float* ckq = reinterpret_cast<float*>(smem + L.ckq);

  // 2. Tokens of the key head and the tile's v columns (cp.async, no registers held).
  const int64_t tok0 = it.token_offset;
  for (int idx = tid; idx < m * (kK / 4); idx += NT) {
    const int i = idx / (kK / 4), c = 4 * (idx % (kK / 4));
    const int64_t src = ((tok0 + i) * g.H + h) * kK + c;
    CpAsync16(qs + i * kK + c, A.prep.q + src);
    CpAsync16(ks + i * kK + c, A.prep.k + src);
  }
  for (int idx = tid; idx < m * CG; idx += NT) {
    const int i = idx / CG, c = 4 * (idx % CG);
    CpAsync16(vs + i * TC + c, A.prep.v + ((tok0 + i) * g.HV + hv) * kV + col0 + c);
  }
  if (tid < m) {
    CpAsync4(Gi + tid, A.prep.G + (tok0 + tid) * g.HV + hv);
    CpAsync4(bi + tid, A.prep.beta + (tok0 + tid) * g.HV + hv);
  }
  CpAsyncCommit();  // tokens: the state products need only these
  // 3. Buffer rows (to fold, or to combine with): warp w gathers rows w, w + NW, ... (k^ of
  // head h, u of the tile, G).
  const int kchunks = kK * es / 16, uchunks = TC * es / 16;
  for (int j = warp; j < n; j += NW) {
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j, &slot);
    const uint8_t* kp = static_cast<const uint8_t*>(RowK(A.pools, g, blk, slot, h));
    const uint8_t* up = static_cast<const uint8_t*>(RowU(A.pools, g, blk, slot, hv)) + col0 * es;
    for (int c = lane; c < kchunks; c += 32) CpAsync16(krow + j * kK * es + c * 16, kp + c * 16);
    if (lane < uchunks) CpAsync16(urow + j * TC * es + lane * 16, up + lane * 16);
    if (lane == 31) CpAsync4(grow + j, RowG(A.pools, g, blk, slot, hv));
  }
  CpAsyncCommit();
  // Row blocks of the new rows (read once here, used by the stores at the end).
  if (tid >= NT - m) {
    const int i = NT - 1 - tid;
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n_eff + i, &slot);
    rnew[i] = blk;
  }
  // A fold needs the rows first; otherwise the state products start while the rows (one more
  // dependent hop: descriptor -> page table -> rows) are still arriving.
  if (kFold) {
    CpAsyncWaitAll();
  } else {
    CpAsyncWaitAllButOne();
  }
  __syncthreads();

  // The old rows are staged: arrive on the (item, key head) counter; the last block of the group
  // writes the shared k^/G rows of the new tokens at the end.
  bool writer = hv % group == 0 && tile == 0;
  if (kFold) {
    int* flag = reinterpret_cast<int*>(ckq + M * M);
    if (tid == 0) {
      int* counter = A.counters + static_cast<int64_t>(item) * g.H + h;
      const int prev = atomicAdd(counter, 1);
      const int last = prev == group * kTiles - 1;
      if (last) atomicExch(counter, 0);
      *flag = last;
    }
    // Fold: S <- e^{G_n} S + sum_j e^{G_n - G_j} k^_j u_j^T on the register tile, written back.
    if (fold) {
      const float Gn = grow[n - 1];
      const float dn = expf(Gn);
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        s[i].x *= dn;
        s[i].y *= dn;
        s[i].z *= dn;
        s[i].w *= dn;
      }
      for (int j = 0; j < n; ++j) {
        float4 w = Load4(urow + j * TC * es, bdt, 4 * cg);
        const float cf = expf(Gn - grow[j]);
        w.x *= cf;
        w.y *= cf;
        w.z *= cf;
        w.w *= cf;
        const uint8_t* kr = krow + j * kK * es;
#pragma unroll
        for (int i = 0; i < RPT; i += 4) {
          const float4 kv = Load4(kr, bdt, rg * RPT + i);
          Axpy4(s[i], kv.x, w);
          Axpy4(s[i + 1], kv.y, w);
          Axpy4(s[i + 2], kv.z, w);
          Axpy4(s[i + 3], kv.w, w);
        }
      }
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        __stcs(reinterpret_cast<float4*>(S + (rg * RPT + i) * kV + 4 * cg), s[i]);
      }
    }
    __syncthreads();
    writer = *flag != 0;
  }

  // 4. Partial p = S^T q^, r = S^T k^ over this thread's rows, reduced over the warp's row groups;
  // one token at a time, so drafts cost no registers beyond one token's accumulators.
  if (load_state || fold) {
#pragma unroll 1
    for (int t = 0; t < m; ++t) {
      float4 p = make_float4(0.f, 0.f, 0.f, 0.f), r = p;
#pragma unroll
      for (int i = 0; i < RPT; i += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(qs + t * kK + rg * RPT + i);
        const float4 kv = *reinterpret_cast<const float4*>(ks + t * kK + rg * RPT + i);
        Axpy4(p, qv.x, s[i]);
        Axpy4(p, qv.y, s[i + 1]);
        Axpy4(p, qv.z, s[i + 2]);
        Axpy4(p, qv.w, s[i + 3]);
        Axpy4(r, kv.x, s[i]);
        Axpy4(r, kv.y, s[i + 1]);
        Axpy4(r, kv.z, s[i + 2]);
        Axpy4(r, kv.w, s[i + 3]);
      }
#pragma unroll
      for (int off = CG; off < 32; off <<= 1) {
        const float4 a = Shfl4(p, off), b = Shfl4(r, off);
        Add4(p, a);
        Add4(r, b);
      }
      if (lane < CG) {
        *reinterpret_cast<float4*>(red + ((warp * M + t) * 2) * TC + 4 * cg) = p;
        *reinterpret_cast<float4*>(red + ((warp * M + t) * 2 + 1) * TC + 4 * cg) = r;
      }
    }
  }

  if (!kFold) {
    CpAsyncWaitAll();
    __syncthreads();
  }

  // 5. Buffer rows: decayed dot products with each token, accumulated into the tile's columns
  // (lane -> columns lane, lane + 32, ... of the tile); one token at a time.
  constexpr int CPL = TC / 32;  // columns per lane
#pragma unroll 1
  for (int t = 0; t < m; ++t) {
    float cy[CPL], co[CPL];
#pragma unroll
    for (int c = 0; c < CPL; ++c) cy[c] = co[c] = 0.f;
    const float4 kt = *reinterpret_cast<const float4*>(ks + t * kK + 4 * lane);
    const float4 qt = *reinterpret_cast<const float4*>(qs + t * kK + 4 * lane);
    for (int j = warp; j < n_eff; j += NW) {
      const float4 kj = Load4(krow + j * kK * es, bdt, 4 * lane);
      const float d = expf(Gi[t] - grow[j]);
      const float a = WarpSum(Dot4(kj, kt)) * d;
      const float b = WarpSum(Dot4(kj, qt)) * d;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const float uj = LoadElem(urow + j * TC * es, bdt, lane + 32 * c);
        cy[c] = fmaf(a, uj, cy[c]);
        co[c] = fmaf(b, uj, co[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      rrd[((warp * M + t) * 2) * TC + lane + 32 * c] = cy[c];
      rrd[((warp * M + t) * 2 + 1) * TC + lane + 32 * c] = co[c];
    }
  }
  // Token-token coefficients: warp w takes the pairs (i, l <= i) with (i * M + l) % NW == w.
  for (int pi = warp; pi < m * m; pi += NW) {
    const int i = pi / m, l = pi % m;
    if (l > i) continue;
    const float4 kl = *reinterpret_cast<const float4*>(ks + l * kK + 4 * lane);
    const float a = WarpSum(Dot4(kl, *reinterpret_cast<const float4*>(ks + i * kK + 4 * lane)));
    const float b = WarpSum(Dot4(kl, *reinterpret_cast<const float4*>(qs + i * kK + 4 * lane)));
    if (lane == 0) {
      const float d = expf(Gi[i] - Gi[l]);
      ckk[i * M + l] = l < i ? a * d : 0.f;
      ckq[i * M + l] = b * d;
    }
  }
  __syncthreads();

  // 6. One thread per column: sum the partials, forward substitution over the tokens, stores.
  const bool any_state = load_state || fold;
  if (tid < TC) {
    const int col = col0 + tid;
    float un[M];
#pragma unroll
    for (int i = 0; i < M; ++i) {
      un[i] = 0.f;
      if (i >= m) continue;
      float pp = 0.f, rr = 0.f, yy = 0.f, oo = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        if (any_state) {
          pp += red[((w * M + i) * 2) * TC + tid];
          rr += red[((w * M + i) * 2 + 1) * TC + tid];
        }
        yy += rrd[((w * M + i) * 2) * TC + tid];
        oo += rrd[((w * M + i) * 2 + 1) * TC + tid];
      }
      const float eg = expf(Gi[i]);
      float y = fmaf(eg, rr, yy), o = fmaf(eg, pp, oo);
#pragma unroll
      for (int l = 0; l < M; ++l) {
        if (l < i) {
          y = fmaf(ckk[i * M + l], un[l], y);
          o = fmaf(ckq[i * M + l], un[l], o);
        }
      }
      const float u = bi[i] * (vs[i * TC + tid] - y);
      un[i] = u;
      o = fmaf(ckq[i * M + i], u, o);
      StoreElem(A.out, A.out_dtype, ((tok0 + i) * g.HV + hv) * kV + col, o);
      const int32_t slot = static_cast<int32_t>((n_eff + i) % g.page_tokens);
      StoreElem(RowU(A.pools, g, rnew[i], slot, hv), bdt, col, u);
    }
  }
  // New k^ rows of key head h and G of the group's value heads (one block of the group).
  if (writer) {
    for (int idx = tid; idx < m * (kK / 4); idx += NT) {
      const int i = idx / (kK / 4), c = 4 * (idx % (kK / 4));
      const int32_t slot = static_cast<int32_t>((n_eff + i) % g.page_tokens);
      Store4(RowK(A.pools, g, rnew[i], slot, h), bdt, c,
             *reinterpret_cast<const float4*>(ks + i * kK + c));
    }
    for (int idx = tid; idx < m * group; idx += NT) {
      const int i = idx / group, hh = h * group + idx % group;
      const int32_t slot = static_cast<int32_t>((n_eff + i) % g.page_tokens);
      *RowG(A.pools, g, rnew[i], slot, hh) = A.prep.G[(tok0 + i) * g.HV + hh];
    }
  }
  // A fresh slot without a fold starts as zero.
  if (has_state && is_new && !fold) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      __stcs(reinterpret_cast<float4*>(S + (rg * RPT + i) * kV + 4 * cg),
             make_float4(0.f, 0.f, 0.f, 0.f));
    }
  }
}

template <int M, int TC, int RPT, bool kFold>
cudaError_t Launch(const StepArgs& args, int32_t first, int32_t count, cudaStream_t stream) {
  constexpr int NT = StreamThreads(TC, RPT);
  auto* fn = StreamKernel<M, TC, RPT, kFold>;
  const size_t smem = static_cast<size_t>(
      MakeStreamSmem(M, TC, NT, args.max_rows, DTypeBytes(args.pools.buffer_dtype)).total);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  constexpr int32_t kMaxGridY = 65535;
  for (int32_t at = 0; at < count; at += kMaxGridY) {
    const int32_t items = count - at < kMaxGridY ? count - at : kMaxGridY;
    dim3 grid(static_cast<unsigned>(args.g.HV * (kV / TC)), static_cast<unsigned>(items));
    fn<<<grid, NT, smem, stream>>>(args, first + at);
  }
  return cudaGetLastError();
}

template <int TC, int RPT, bool kFold>
cudaError_t LaunchTokens(const StepArgs& args, int32_t first, int32_t count, cudaStream_t stream) {
  if (args.max_tokens <= 1) return Launch<1, TC, RPT, kFold>(args, first, count, stream);
  if (args.max_tokens <= 2) return Launch<2, TC, RPT, kFold>(args, first, count, stream);
  return Launch<4, TC, RPT, kFold>(args, first, count, stream);
}

template <int TC, int RPT>
cudaError_t LaunchShape(const StepArgs& args, int32_t first, int32_t count, bool fold,
                        cudaStream_t stream) {
  return fold ? LaunchTokens<TC, RPT, true>(args, first, count, stream)
              : LaunchTokens<TC, RPT, false>(args, first, count, stream);
}

}  // namespace

bool BufferedStepStreamFits(const StepArgs& a) {
  if (a.g.K != kK || a.g.V != kV || a.max_tokens > kStreamMaxTokens || a.max_tokens < 0) {
    return false;
  }
  if (a.g.HV % a.g.H != 0 || a.pools.block_bytes % 16 != 0 || a.pools.u_offset % 16 != 0 ||
      a.pools.page_bytes % 16 != 0 || a.max_rows > kStreamMaxRows) {
    return false;
  }
  return true;
}

cudaError_t LaunchBufferedStepStream(const StepArgs& args, int32_t first, int32_t count, bool fold,
                                     cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  switch (args.variant) {
    case 7:
      return LaunchShape<32, 8>(args, first, count, fold, stream);
    case 8:
    case 9:
      return LaunchShape<64, 8>(args, first, count, fold, stream);
    case 10:
      return LaunchShape<128, 8>(args, first, count, fold, stream);
    case 11:
      return LaunchShape<64, 16>(args, first, count, fold, stream);
    case 12:
      return LaunchShape<128, 16>(args, first, count, fold, stream);
    case 13:
      return LaunchShape<32, 16>(args, first, count, fold, stream);
    default:
      break;
  }
  // Best measured shape per case (H100, bench/NOTES.md v7): few items are latency-bound and want
  // many small blocks; drafts over many items want whole heads (tokens and rows staged once per
  // head, 16 state rows per thread); otherwise 64 columns with 16 state rows per thread (5
  // blocks per SM).
  if (args.max_tokens >= 2) {
    if (count >= 128 || (count >= 4 && count < 32)) {
      return LaunchShape<128, 16>(args, first, count, fold, stream);
    }
    return LaunchShape<64, 8>(args, first, count, fold, stream);
  }
  if (count < 32) return LaunchShape<64, 8>(args, first, count, fold, stream);
  return LaunchShape<64, 16>(args, first, count, fold, stream);
}

}  // namespace kvbuffer::cuda
