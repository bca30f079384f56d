// Design note (the fold_first race): a step that folds appends its new rows at row 0 while the
// fold reads the old rows. u rows are private to a (value head, column tile) block, so each block
// reads its old u tile before writing its new one. k^ rows (per key head, shared by HV/H value
// heads and all column tiles) and G rows (shared by the column tiles) are read by every block of
// the key-head group; the new k^ and G rows depend only on the prepared tokens, so they are
// written by the last block of the group to finish its fold reads (an atomic arrival counter per
// item and key head, reset by that block). No block ever waits on another, so there is no
// deadlock, and the fold stays fused into the decode pass (one read + one write of S).
#include "kernels/cuda/buffered_step.h"
#include "kernels/cuda/buffered_step_internal.h"
#include "kernels/cuda/common.cuh"

namespace kvbuffer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRowGroups = 16;  // kThreads / (kStepBV / 4)
constexpr int kFoldRows = 16;   // buffer rows staged per fold round

// Shared-memory carve-up (in floats, each region 4-float aligned).
struct StepSmem {
  int qs, ks, red, pr, un, ub, gb, dkk, dkq, gi, bi, kf, uf, cf, flag, total;
  int rows_ld;
};

__host__ __device__ inline int Align4(int x) { return (x + 3) & ~3; }

__host__ __device__ inline StepSmem MakeSmem(int K, int mmax, int nmax, bool any_fold) {
  StepSmem s;
  const int BV = kStepBV;
  int o = 0;
  auto take = [&o](int n) {
    const int at = o;
    o += Align4(n);
    return at;
  };
  s.rows_ld = nmax + mmax;
  s.qs = take(mmax * K);
  s.ks = take(mmax * K);
  s.red = take(2 * mmax * 4 * BV);
  s.pr = take(2 * mmax * BV);
  s.un = take(mmax * BV);
  s.ub = take(nmax * BV);
  s.gb = take(nmax);
  s.dkk = take(mmax * s.rows_ld);
  s.dkq = take(mmax * s.rows_ld);
  s.gi = take(mmax);
  s.bi = take(mmax);
  s.kf = take(any_fold ? kFoldRows * K : 0);
  s.uf = take(any_fold ? kFoldRows * BV : 0);
  s.cf = take(any_fold ? kFoldRows : 0);
  s.flag = take(4);
  s.total = o;
  return s;
}

__device__ __forceinline__ void Fma4(float4& acc, const float4& s, float x) {
  acc.x = fmaf(s.x, x, acc.x);
  acc.y = fmaf(s.y, x, acc.y);
  acc.z = fmaf(s.z, x, acc.z);
  acc.w = fmaf(s.w, x, acc.w);
}

__device__ __forceinline__ void ReduceRowGroups(float4& v) {
#pragma unroll
  for (int o = 8; o <= 16; o <<= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    v.z += __shfl_xor_sync(0xffffffffu, v.z, o);
    v.w += __shfl_xor_sync(0xffffffffu, v.w, o);
  }
}

template <int R>
__global__ void __launch_bounds__(kThreads) BufferedStepKernel(StepArgs A) {
  constexpr int BV = kStepBV;
  const Geometry& g = A.g;
  const int item_idx = blockIdx.x;
  const StepDesc it = A.items[item_idx];
  const int nvt = (g.V + BV - 1) / BV;
  const int hv = blockIdx.y / nvt, vt = blockIdx.y % nvt;
  const int group = g.HV / g.H, h = hv / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = tid >> 3, c4 = tid & 7;
  const int K = g.K, V = g.V;
  const int col0 = vt * BV + c4 * 4;
  const bool col_ok = col0 < V;
  const int m = it.num_tokens, n = it.buffer_rows;
  const bool fold_flag = (it.flags & kFoldFirst) != 0;
  const bool fold = fold_flag && n > 0;
  const int n_eff = fold_flag ? 0 : n;
  const bool has_state = it.state_slot >= 0;
  const bool load_state = has_state && !(it.flags & kStateNew);
  const bool fold_after = (it.flags & kFoldAfter) != 0;
  const int bdt = A.pools.buffer_dtype;

  extern __shared__ __align__(16) float smem[];
  const StepSmem L = MakeSmem(K, A.max_tokens, A.max_rows, A.any_fold);
  float* qs = smem + L.qs;
  float* ks = smem + L.ks;
  float* red = smem + L.red;
  float* pr = smem + L.pr;
  float* un = smem + L.un;
  float* ub = smem + L.ub;
  float* gb = smem + L.gb;
  float* dkk = smem + L.dkk;
  float* dkq = smem + L.dkq;
  float* Gi = smem + L.gi;
  float* bi = smem + L.bi;
  float* kf = smem + L.kf;
  float* uf = smem + L.uf;
  float* cf = smem + L.cf;
  int* flag = reinterpret_cast<int*>(smem + L.flag);

  // 1. The state tile: every load in flight before anything waits on it.
  float* S = has_state ? StatePtr(A.pools, g, it.state_slot, A.layer, hv) : nullptr;
  float4 s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int k = rg + kRowGroups * r;
    s[r] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (load_state && col_ok && k < K) {
      s[r] = __ldcs(reinterpret_cast<const float4*>(S + static_cast<int64_t>(k) * V + col0));
    }
  }

  // 2. Tokens, gates and the old buffer rows this tile combines with.
  for (int idx = tid; idx < m * K; idx += kThreads) {
    const int i = idx / K, c = idx - (idx / K) * K;
    const int64_t src = ((static_cast<int64_t>(it.token_offset) + i) * g.H + h) * K + c;
    qs[i * K + c] = A.prep.q[src];
    ks[i * K + c] = A.prep.k[src];
  }
  for (int i = tid; i < m; i += kThreads) {
    const int64_t t = (static_cast<int64_t>(it.token_offset) + i) * g.HV + hv;
    Gi[i] = A.prep.G[t];
    bi[i] = A.prep.beta[t];
  }
  for (int idx = tid; idx < n_eff * BV; idx += kThreads) {
    const int j = idx / BV, c = idx % BV, col = vt * BV + c;
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j, &slot);
    ub[j * BV + c] = col < V ? LoadElem(RowU(A.pools, g, blk, slot, hv), bdt, col) : 0.f;
    if (c == 0) gb[j] = *RowG(A.pools, g, blk, slot, hv);
  }
  __syncthreads();

  // 3. Fused fold: S <- e^{G_n} S + sum_j e^{G_n - G_j} k^_j u_j^T.
  int writer;
  if (fold) {
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n - 1, &slot);
    const float Gn = *RowG(A.pools, g, blk, slot, hv);
    const float dn = expf(Gn);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r].x *= dn;
      s[r].y *= dn;
      s[r].z *= dn;
      s[r].w *= dn;
    }
    for (int j0 = 0; j0 < n; j0 += kFoldRows) {
      const int jn = min(kFoldRows, n - j0);
      for (int idx = tid; idx < jn * K; idx += kThreads) {
        const int j = idx / K, c = idx - (idx / K) * K;
        uint8_t* b2 =
            RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j0 + j, &slot);
        kf[j * K + c] = LoadElem(RowK(A.pools, g, b2, slot, h), bdt, c);
      }
      for (int idx = tid; idx < jn * BV; idx += kThreads) {
        const int j = idx / BV, c = idx % BV, col = vt * BV + c;
        uint8_t* b2 =
            RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j0 + j, &slot);
        uf[j * BV + c] = col < V ? LoadElem(RowU(A.pools, g, b2, slot, hv), bdt, col) : 0.f;
      }
      if (tid < jn) {
        uint8_t* b2 = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                               j0 + tid, &slot);
        cf[tid] = expf(Gn - *RowG(A.pools, g, b2, slot, hv));
      }
      __syncthreads();
      for (int j = 0; j < jn; ++j) {
        const float cj = cf[j];
        const float4 u4 = *reinterpret_cast<const float4*>(uf + j * BV + c4 * 4);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int k = rg + kRowGroups * r;
          if (k < K) {
            const float kv = kf[j * K + k] * cj;
            s[r].x = fmaf(kv, u4.x, s[r].x);
            s[r].y = fmaf(kv, u4.y, s[r].y);
            s[r].z = fmaf(kv, u4.z, s[r].z);
            s[r].w = fmaf(kv, u4.w, s[r].w);
          }
        }
      }
      __syncthreads();
    }
    // Every old k^/G row this block needs has been read; the group's last block writes new rows.
    if (tid == 0) {
      __threadfence();
      int* counter = A.counters + static_cast<int64_t>(item_idx) * g.H + h;
      const int prev = atomicAdd(counter, 1);
      const int last = prev == group * nvt - 1;
      if (last) {
        atomicExch(counter, 0);
        __threadfence();
      }
      *flag = last;
    }
    __syncthreads();
    writer = *flag;
  } else {
    writer = (hv % group == 0) && vt == 0;
  }

  if (has_state && (fold || (it.flags & kStateNew)) && !fold_after) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int k = rg + kRowGroups * r;
      if (col_ok && k < K) {
        __stcs(reinterpret_cast<float4*>(S + static_cast<int64_t>(k) * V + col0), s[r]);
      }
    }
  }
  if (m == 0) return;

  // 4. Shared parts of the new rows: k^ of key head h, G of the group's value heads.
  if (writer && !fold_after) {
    for (int idx = tid; idx < m * K; idx += kThreads) {
      const int i = idx / K, c = idx - (idx / K) * K;
      int32_t slot;
      uint8_t* blk =
          RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n_eff + i, &slot);
      StoreElem(RowK(A.pools, g, blk, slot, h), bdt, c, ks[i * K + c]);
    }
    for (int idx = tid; idx < m * group; idx += kThreads) {
      const int i = idx / group, hh = h * group + idx % group;
      int32_t slot;
      uint8_t* blk =
          RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n_eff + i, &slot);
      *RowG(A.pools, g, blk, slot, hh) =
          A.prep.G[(static_cast<int64_t>(it.token_offset) + i) * g.HV + hh];
    }
  }

  // 5. Decayed dot products of the tokens with every earlier row (buffer and earlier tokens).
  const int rows = n_eff + m;
  for (int j = warp; j < rows; j += kThreads / 32) {
    float kj[8];
    int32_t slot = 0;
    uint8_t* blk = nullptr;
    if (j < n_eff) {
      blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j, &slot);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int c = lane + 32 * e;
      kj[e] = 0.f;
      if (c < K) {
        kj[e] =
            j < n_eff ? LoadElem(RowK(A.pools, g, blk, slot, h), bdt, c) : ks[(j - n_eff) * K + c];
      }
    }
    for (int i = 0; i < m; ++i) {
      if (j > n_eff + i) continue;
      float a = 0.f, b = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int c = lane + 32 * e;
        if (c < K) {
          a = fmaf(kj[e], ks[i * K + c], a);
          b = fmaf(kj[e], qs[i * K + c], b);
        }
      }
      a = WarpSum(a);
      b = WarpSum(b);
      if (lane == 0) {
        const float Gj = j < n_eff ? gb[j] : Gi[j - n_eff];
        const float d = expf(Gi[i] - Gj);
        dkk[i * L.rows_ld + j] = j < n_eff + i ? a * d : 0.f;
        dkq[i * L.rows_ld + j] = b * d;
      }
    }
  }

  // 6. p_i = S^T q^_i and r_i = S^T k^_i: one pass over the registers, 2m right-hand sides.
  if (has_state) {
    for (int i = 0; i < m; ++i) {
      float4 pq = make_float4(0.f, 0.f, 0.f, 0.f), pk = pq;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int k = rg + kRowGroups * r;
        if (k < K) {
          Fma4(pq, s[r], qs[i * K + k]);
          Fma4(pk, s[r], ks[i * K + k]);
        }
      }
      ReduceRowGroups(pq);
      ReduceRowGroups(pk);
      if (lane < 8) {
        *reinterpret_cast<float4*>(red + ((2 * i) * 4 + warp) * BV + c4 * 4) = pq;
        *reinterpret_cast<float4*>(red + ((2 * i + 1) * 4 + warp) * BV + c4 * 4) = pk;
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < 2 * m * BV; idx += kThreads) {
    const int which = idx / BV, c = idx % BV;
    float v = 0.f;
    if (has_state) {
#pragma unroll
      for (int w = 0; w < 4; ++w) v += red[(which * 4 + w) * BV + c];
    }
    pr[which * BV + c] = v;
  }
  __syncthreads();

  // 7. Forward substitution over the tokens, one thread per value column.
  if (tid < BV) {
    const int c = tid, col = vt * BV + c;
    if (col < V) {
      for (int i = 0; i < m; ++i) {
        const int64_t tok = static_cast<int64_t>(it.token_offset) + i;
        const float eg = expf(Gi[i]);
        float o = eg * pr[(2 * i) * BV + c];
        float y = eg * pr[(2 * i + 1) * BV + c];
        const float* kk = dkk + i * L.rows_ld;
        const float* kq = dkq + i * L.rows_ld;
        for (int j = 0; j < n_eff; ++j) {
          const float uj = ub[j * BV + c];
          y = fmaf(kk[j], uj, y);
          o = fmaf(kq[j], uj, o);
        }
        for (int l = 0; l < i; ++l) {
          const float ul = un[l * BV + c];
          y = fmaf(kk[n_eff + l], ul, y);
          o = fmaf(kq[n_eff + l], ul, o);
        }
        const float u = bi[i] * (A.prep.v[(tok * g.HV + hv) * V + col] - y);
        o = fmaf(kq[n_eff + i], u, o);
        un[i * BV + c] = u;
        StoreElem(A.out, A.out_dtype, (tok * g.HV + hv) * V + col, o);
        if (!fold_after) {
          int32_t slot;
          uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                                  n_eff + i, &slot);
          StoreElem(RowU(A.pools, g, blk, slot, hv), bdt, col, u);
        }
      }
    }
  }

  // 8. kFoldAfter (exact chunked prefill in slices): S <- e^{G_m} S + sum_i e^{G_m-G_i} k^_i u_i^T.
  if (fold_after && has_state) {
    __syncthreads();
    const float Gm = Gi[m - 1];
    const float dm = expf(Gm);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r].x *= dm;
      s[r].y *= dm;
      s[r].z *= dm;
      s[r].w *= dm;
    }
    for (int i = 0; i < m; ++i) {
      const float ci = expf(Gm - Gi[i]);
      const float4 u4 = *reinterpret_cast<const float4*>(un + i * BV + c4 * 4);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int k = rg + kRowGroups * r;
        if (k < K) {
          const float kv = ks[i * K + k] * ci;
          s[r].x = fmaf(kv, u4.x, s[r].x);
          s[r].y = fmaf(kv, u4.y, s[r].y);
          s[r].z = fmaf(kv, u4.z, s[r].z);
          s[r].w = fmaf(kv, u4.w, s[r].w);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int k = rg + kRowGroups * r;
      if (col_ok && k < K) {
        __stcs(reinterpret_cast<float4*>(S + static_cast<int64_t>(k) * V + col0), s[r]);
      }
    }
  }
}

template <int R>
cudaError_t Launch(const StepArgs& args, size_t smem, cudaStream_t stream) {
  auto* fn = BufferedStepKernel<R>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int nvt = (args.g.V + kStepBV - 1) / kStepBV;
  dim3 grid(args.num_items, args.g.HV * nvt);
  fn<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

// Every item through the general kernels (head, tile or register kernel).
cudaError_t LaunchGeneral(const StepArgs& args, cudaStream_t stream) {
  if (args.max_tokens > kMaxStepTokens || args.g.K > 256 || args.g.V % 4 != 0 ||
      args.g.HV % args.g.H != 0) {
    return cudaErrorInvalidValue;
  }
  if ((args.variant == 0 || args.variant >= 3) && BufferedStepHeadFits(args)) {
    return LaunchBufferedStepHead(args, stream);
  }
  if (args.variant != 1 && BufferedStepTileFits(args)) return LaunchBufferedStepTile(args, stream);
  const size_t smem = BufferedStepSmemBytes(args);
  if (smem > 200 * 1024) return cudaErrorInvalidValue;
  const int r = (args.g.K + kRowGroups - 1) / kRowGroups;
  if (r <= 1) return Launch<1>(args, smem, stream);
  if (r <= 2) return Launch<2>(args, smem, stream);
  if (r <= 4) return Launch<4>(args, smem, stream);
  if (r <= 8) return Launch<8>(args, smem, stream);
  return Launch<16>(args, smem, stream);
}

}  // namespace

size_t BufferedStepSmemBytes(const StepArgs& args) {
  return static_cast<size_t>(
             MakeSmem(args.g.K, args.max_tokens, args.max_rows, args.any_fold).total) *
         sizeof(float);
}

cudaError_t LaunchBufferedStep(const StepArgs& args, cudaStream_t stream) {
  if (args.num_items == 0) return cudaSuccess;
  const int32_t sb = args.stream_begin, fe = args.stream_fold_end;
  if (sb < 0 || sb >= args.num_items || fe < sb || fe > args.num_items ||
      !(args.variant == 0 || (args.variant >= 7 && args.variant <= 13))) {
    return LaunchGeneral(args, stream);
  }
  StepArgs st = args;
  st.max_tokens = args.stream_max_tokens;
  st.max_rows = args.stream_max_rows;
  if (!BufferedStepStreamFits(st)) return LaunchGeneral(args, stream);
  if (sb > 0) {
    StepArgs general = args;
    general.num_items = sb;
    if (const cudaError_t e = LaunchGeneral(general, stream); e != cudaSuccess) return e;
  }
  if (fe > sb) {
    if (const cudaError_t e = LaunchBufferedStepStream(st, sb, fe - sb, true, stream);
        e != cudaSuccess) {
      return e;
    }
  }
  return LaunchBufferedStepStream(st, fe, args.num_items - fe, false, stream);
}

}  // namespace kvbuffer::cuda
