// Buffered decode / verify / fold with a half-width state tile (K x V/2) of one (item, value
// head) staged in shared memory by cp.async. Every global load of a block (state tile, the buffer
// rows it combines with or folds, tokens, gates) is issued up front, so a block holds almost no
// registers while it waits and many blocks fit on an SM; two threads per value column then sweep
// the tile (fold, p = S^T q^, r = S^T k^) and one finishes the column (forward substitution).
// The fold_first race is handled as in buffered_step.cu (last block of the key-head group writes
// the shared k^/G rows).
#include "kernels/cuda/buffered_step_internal.h"
#include "kernels/cuda/common.cuh"

namespace kvbuffer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kFoldRows = 16;
constexpr int kMaxTileCols = 64;

struct TileSmem {
  int st, qs, ks, gi, bi, dkk, dkq, gb, red, un, urows, krows, misc, total;
  int rows_ld;
};

__host__ __device__ inline int TileCols(int V) { return V < kMaxTileCols ? V : kMaxTileCols; }

__host__ __device__ inline TileSmem MakeTileSmem(int K, int V, int mmax, int nmax, bool any_fold,
                                                 int es) {
  TileSmem s;
  const int bv = TileCols(V), parts = kThreads / bv;
  int o = 0;
  auto take = [&o](int n) {
    const int at = o;
    o += (n + 31) & ~31;  // 128-byte aligned regions
    return at;
  };
  s.rows_ld = nmax + mmax;
  s.st = take(K * bv);
  s.qs = take(mmax * K);
  s.ks = take(mmax * K);
  s.gi = take(mmax);
  s.bi = take(mmax);
  s.dkk = take(mmax * s.rows_ld);
  s.dkq = take(mmax * s.rows_ld);
  s.gb = take((nmax > kFoldRows ? nmax : kFoldRows) + 1);
  s.red = take(parts * mmax * 2 * bv);
  s.un = take(mmax * bv);
  const int nu = nmax > (any_fold ? kFoldRows : 0) ? nmax : (any_fold ? kFoldRows : 0);
  s.urows = take(nu * bv * es / 4 + 4);
  s.krows = take(any_fold ? kFoldRows * K * es / 4 + 4 : 0);
  s.misc = take(4);
  s.total = o;
  return s;
}

// Stages rows [j0, j0 + jn) of the u tile (value head hv, columns v0..v0+bv) and, when krows is
// set, of k^ (key head h) with cp.async.
__device__ __forceinline__ void StageRows(const StepArgs& A, const StepDesc& it, int h, int hv,
                                          int v0, int bv, int j0, int jn, uint8_t* urows,
                                          uint8_t* krows) {
  const Geometry& g = A.g;
  const int es = DTypeBytes(A.pools.buffer_dtype);
  const int up = bv * es / 16, kp = krows != nullptr ? g.K * es / 16 : 0;
  const int per = up + kp;
  for (int idx = threadIdx.x; idx < jn * per; idx += kThreads) {
    const int j = idx / per, q = idx % per;
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j0 + j, &slot);
    if (q < up) {
      CpAsync16(urows + (j * up + q) * 16,
                static_cast<uint8_t*>(RowU(A.pools, g, blk, slot, hv)) + v0 * es + q * 16);
    } else {
      CpAsync16(krows + (j * kp + q - up) * 16,
                static_cast<uint8_t*>(RowK(A.pools, g, blk, slot, h)) + (q - up) * 16);
    }
  }
}

// Loads element i of a buffer-dtype array (fp32 or bf16/fp16 bits) from shared memory.
__device__ __forceinline__ float RowElem(const uint8_t* p, int bdt, int i) {
  return LoadElem(p, bdt, i);
}

template <int MAXM>
__global__ void __launch_bounds__(kThreads, 5) BufferedStepTileKernel(StepArgs A) {
  const Geometry& g = A.g;
  const int K = g.K, V = g.V;
  const int bv = TileCols(V), nsplit = V / bv, parts = kThreads / bv;
  const int item_idx = blockIdx.x, hv = blockIdx.y / nsplit, vs = blockIdx.y % nsplit;
  const int v0 = vs * bv;
  const StepDesc it = A.items[item_idx];
  const int group = g.HV / g.H, h = hv / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cl = tid % bv, part = tid / bv;  // local column, row phase
  const int c = v0 + cl;                     // global column
  const int m = it.num_tokens, n = it.buffer_rows;
  const bool fold_flag = (it.flags & kFoldFirst) != 0;
  const bool fold = fold_flag && n > 0;
  const int n_eff = fold_flag ? 0 : n;
  const bool has_state = it.state_slot >= 0;
  const bool is_new = (it.flags & kStateNew) != 0;
  const bool load_state = has_state && !is_new;
  const bool fold_after = (it.flags & kFoldAfter) != 0;
  const int bdt = A.pools.buffer_dtype;
  const int es = DTypeBytes(bdt);
  const int64_t tok0 = it.token_offset;

  extern __shared__ __align__(128) float smem[];
  const int mmax = A.max_tokens > 0 ? A.max_tokens : 1;
  const TileSmem L = MakeTileSmem(K, V, mmax, A.max_rows, A.any_fold, es);
  float* St = smem + L.st;  // [K][bv]
  float* qs = smem + L.qs;
  float* ks = smem + L.ks;
  float* Gi = smem + L.gi;
  float* bi = smem + L.bi;
  float* dkk = smem + L.dkk;
  float* dkq = smem + L.dkq;
  float* gb = smem + L.gb;
  float* red = smem + L.red;
  float* unew = smem + L.un;
  uint8_t* urows = reinterpret_cast<uint8_t*>(smem + L.urows);
  uint8_t* krows = reinterpret_cast<uint8_t*>(smem + L.krows);
  float* misc = smem + L.misc;

  // 1. Asynchronous copies: the state tile and the buffer rows this block reads.
  float* S = has_state ? StatePtr(A.pools, g, it.state_slot, A.layer, hv) : nullptr;
  if (load_state) {
    const int per = bv / 4;
    for (int i = tid; i < K * per; i += kThreads) {
      const int k = i / per, q = i % per;
      CpAsync16(St + k * bv + 4 * q, S + static_cast<int64_t>(k) * V + v0 + 4 * q);
    }
  }
  if (n_eff > 0) {
    StageRows(A, it, h, hv, v0, bv, 0, n_eff, urows, nullptr);
  } else if (fold) {
    StageRows(A, it, h, hv, v0, bv, 0, min(kFoldRows, n), urows, krows);
  }
  CpAsyncCommit();
  if (has_state && !load_state) {
    for (int i = tid; i < K * bv; i += kThreads) St[i] = 0.f;
  }

  // 2. Tokens, gates and old G with plain loads while the copies fly.
  for (int idx = tid; idx < m * K; idx += kThreads) {
    const int i = idx / K, cc = idx - (idx / K) * K;
    const int64_t src = ((tok0 + i) * g.H + h) * K + cc;
    qs[i * K + cc] = A.prep.q[src];
    ks[i * K + cc] = A.prep.k[src];
  }
  for (int i = tid; i < m; i += kThreads) {
    Gi[i] = A.prep.G[(tok0 + i) * g.HV + hv];
    bi[i] = A.prep.beta[(tok0 + i) * g.HV + hv];
  }
  float vv[MAXM];
#pragma unroll
  for (int i = 0; i < MAXM; ++i) {
    vv[i] = (i < m && part == 0) ? A.prep.v[((tok0 + i) * g.HV + hv) * V + c] : 0.f;
  }
  const int ng = fold ? min(kFoldRows, n) : n_eff;
  for (int j = tid; j < ng; j += kThreads) {
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j, &slot);
    gb[j] = *RowG(A.pools, g, blk, slot, hv);
  }
  if (fold && tid == kThreads - 1) {
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n - 1, &slot);
    misc[0] = *RowG(A.pools, g, blk, slot, hv);
  }
  __syncthreads();

  // 3. Decayed dot products with every earlier row; each warp loads its buffer rows in batches.
  const int nrows = m > 0 ? n_eff + m : 0;
  for (int j0 = warp; j0 < nrows; j0 += 4 * (kThreads / 32)) {
    float kj[4][8];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + r * (kThreads / 32);
      int32_t slot = 0;
      uint8_t* blk = nullptr;
      if (j < n_eff) {
        blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j, &slot);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int cc = lane + 32 * e;
        kj[r][e] = 0.f;
        if (cc < K && j < nrows) {
          kj[r][e] = j < n_eff ? LoadElem(RowK(A.pools, g, blk, slot, h), bdt, cc)
                               : ks[(j - n_eff) * K + cc];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + r * (kThreads / 32);
      if (j >= nrows) break;
      for (int i = 0; i < m; ++i) {
        if (j > n_eff + i) continue;
        float a = 0.f, b = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int cc = lane + 32 * e;
          if (cc < K) {
            a = fmaf(kj[r][e], ks[i * K + cc], a);
            b = fmaf(kj[r][e], qs[i * K + cc], b);
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
  }
  CpAsyncWaitAll();
  __syncthreads();

  // 4. Fused fold: S <- e^{G_n} S + sum_j e^{G_n - G_j} k^_j u_j^T (rows of this thread's phase).
  int writer;
  if (fold) {
    const float Gn = misc[0];
    const float dn = expf(Gn);
    for (int j0 = 0; j0 < n; j0 += kFoldRows) {
      const int jn = min(kFoldRows, n - j0);
      if (j0 > 0) {
        __syncthreads();  // the previous chunk is consumed
        StageRows(A, it, h, hv, v0, bv, j0, jn, urows, krows);
        CpAsyncCommit();
        if (tid < jn) {
          int32_t slot;
          uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                                  j0 + tid, &slot);
          gb[tid] = *RowG(A.pools, g, blk, slot, hv);
        }
        CpAsyncWaitAll();
        __syncthreads();
      }
      float w[kFoldRows];
#pragma unroll
      for (int jj = 0; jj < kFoldRows; ++jj) {
        w[jj] = jj < jn ? expf(Gn - gb[jj]) * RowElem(urows, bdt, jj * bv + cl) : 0.f;
      }
      // Rows past jn have w == 0 (and staged or stale finite data), so all 16 are summed.
      if (bdt == kF32) {
        const float* kf = reinterpret_cast<const float*>(krows);
        for (int k = part; k < K; k += parts) {
          float s0 = St[k * bv + cl], s1 = 0.f;
          if (j0 == 0) s0 *= dn;
#pragma unroll
          for (int jj = 0; jj < kFoldRows; jj += 2) {
            if (jj < jn) s0 = fmaf(kf[jj * K + k], w[jj], s0);
            if (jj + 1 < jn) s1 = fmaf(kf[(jj + 1) * K + k], w[jj + 1], s1);
          }
          St[k * bv + cl] = s0 + s1;
        }
      } else {
        const uint16_t* kb = reinterpret_cast<const uint16_t*>(krows);
        const bool bf = bdt == kBF16;
        for (int k = part; k < K; k += parts) {
          float s0 = St[k * bv + cl], s1 = 0.f;
          if (j0 == 0) s0 *= dn;
#pragma unroll
          for (int jj = 0; jj < kFoldRows; jj += 2) {
            const uint16_t b0 = kb[jj * K + k], b1 = kb[(jj + 1) * K + k];
            const float k0 = bf ? Bf16ToFloat(b0) : __half2float(__ushort_as_half(b0));
            const float k1 = bf ? Bf16ToFloat(b1) : __half2float(__ushort_as_half(b1));
            if (jj < jn) s0 = fmaf(k0, w[jj], s0);
            if (jj + 1 < jn) s1 = fmaf(k1, w[jj + 1], s1);
          }
          St[k * bv + cl] = s0 + s1;
        }
      }
    }
    __syncthreads();  // every old row this block reads has been read
    if (tid == 0) {
      __threadfence();
      int* counter = A.counters + static_cast<int64_t>(item_idx) * g.H + h;
      const int prev = atomicAdd(counter, 1);
      const int last = prev == group * nsplit - 1;
      if (last) {
        atomicExch(counter, 0);
        __threadfence();
      }
      misc[1] = last ? 1.f : 0.f;
    }
    __syncthreads();
    writer = misc[1] != 0.f;
  } else {
    writer = hv % group == 0 && vs == 0;
  }

  if (has_state && (fold || is_new) && !fold_after) {
    for (int k = part; k < K; k += parts) {
      __stcs(S + static_cast<int64_t>(k) * V + c, St[k * bv + cl]);
    }
  }
  if (m == 0) return;

  // 5. Shared parts of the new rows: k^ of key head h, G of the group's value heads.
  if (writer && !fold_after) {
    for (int idx = tid; idx < m * K; idx += kThreads) {
      const int i = idx / K, cc = idx - (idx / K) * K;
      int32_t slot;
      uint8_t* blk =
          RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n_eff + i, &slot);
      StoreElem(RowK(A.pools, g, blk, slot, h), bdt, cc, ks[i * K + cc]);
    }
    for (int idx = tid; idx < m * group; idx += kThreads) {
      const int i = idx / group, hh = h * group + idx % group;
      int32_t slot;
      uint8_t* blk =
          RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n_eff + i, &slot);
      *RowG(A.pools, g, blk, slot, hh) = A.prep.G[(tok0 + i) * g.HV + hh];
    }
  }

  // 6. Partial p_i = S^T q^_i, r_i = S^T k^_i over this thread's rows, reduced across phases.
  if (has_state) {
    float p[MAXM], r[MAXM];
#pragma unroll
    for (int i = 0; i < MAXM; ++i) p[i] = r[i] = 0.f;
    for (int k = part; k < K; k += parts) {
      const float s = St[k * bv + cl];
#pragma unroll
      for (int i = 0; i < MAXM; ++i) {
        if (i < m) {
          p[i] = fmaf(s, qs[i * K + k], p[i]);
          r[i] = fmaf(s, ks[i * K + k], r[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < MAXM; ++i) {
      if (i < m) {
        red[((part * mmax + i) * 2) * bv + cl] = p[i];
        red[((part * mmax + i) * 2 + 1) * bv + cl] = r[i];
      }
    }
  }
  __syncthreads();

  // 7. Forward substitution over the tokens (one thread per column).
  if (part == 0) {
    float un[MAXM];
#pragma unroll
    for (int i = 0; i < MAXM; ++i) {
      un[i] = 0.f;
      if (i < m) {
        float p = 0.f, r = 0.f;
        if (has_state) {
          for (int q = 0; q < parts; ++q) {
            p += red[((q * mmax + i) * 2) * bv + cl];
            r += red[((q * mmax + i) * 2 + 1) * bv + cl];
          }
        }
        const float eg = expf(Gi[i]);
        float o = eg * p, y = eg * r;
        const float* kk = dkk + i * L.rows_ld;
        const float* kq = dkq + i * L.rows_ld;
        for (int j = 0; j < n_eff; ++j) {
          const float uj = RowElem(urows, bdt, j * bv + cl);
          y = fmaf(kk[j], uj, y);
          o = fmaf(kq[j], uj, o);
        }
#pragma unroll
        for (int l = 0; l < MAXM; ++l) {
          if (l < i) {
            y = fmaf(kk[n_eff + l], un[l], y);
            o = fmaf(kq[n_eff + l], un[l], o);
          }
        }
        const float u = bi[i] * (vv[i] - y);
        o = fmaf(kq[n_eff + i], u, o);
        un[i] = u;
        unew[i * bv + cl] = u;
        StoreElem(A.out, A.out_dtype, ((tok0 + i) * g.HV + hv) * V + c, o);
        if (!fold_after) {
          int32_t slot;
          uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                                  n_eff + i, &slot);
          StoreElem(RowU(A.pools, g, blk, slot, hv), bdt, c, u);
        }
      }
    }
  }
  if (!fold_after || !has_state) return;

  // 8. kFoldAfter: S <- e^{G_m} S + sum_i e^{G_m - G_i} k^_i u_i^T, written to the pool.
  __syncthreads();
  const float Gm = Gi[m - 1];
  const float dm = expf(Gm);
  float wi[MAXM];
#pragma unroll
  for (int i = 0; i < MAXM; ++i) wi[i] = i < m ? expf(Gm - Gi[i]) * unew[i * bv + cl] : 0.f;
  for (int k = part; k < K; k += parts) {
    float s = St[k * bv + cl] * dm;
#pragma unroll
    for (int i = 0; i < MAXM; ++i) {
      if (i < m) s = fmaf(ks[i * K + k], wi[i], s);
    }
    __stcs(S + static_cast<int64_t>(k) * V + c, s);
  }
}

template <int MAXM>
cudaError_t LaunchTile(const StepArgs& args, size_t smem, cudaStream_t stream) {
  auto* fn = BufferedStepTileKernel<MAXM>;
  cudaError_t e =
      cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const int nsplit = args.g.V / TileCols(args.g.V);
  dim3 grid(args.num_items, args.g.HV * nsplit);
  fn<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

size_t TileSmemBytes(const StepArgs& a) {
  const TileSmem L = MakeTileSmem(a.g.K, a.g.V, a.max_tokens > 0 ? a.max_tokens : 1, a.max_rows,
                                  a.any_fold, DTypeBytes(a.pools.buffer_dtype));
  return static_cast<size_t>(L.total) * sizeof(float);
}

}  // namespace

bool BufferedStepTileFits(const StepArgs& a) {
  const int es = DTypeBytes(a.pools.buffer_dtype);
  const int bv = TileCols(a.g.V);
  if (a.g.V % bv != 0 || kThreads % bv != 0 || bv % 4 != 0) return false;
  if (a.g.K > 256 || a.max_tokens > kMaxStepTokens) return false;
  if ((bv * es) % 16 != 0 || (a.g.K * es) % 16 != 0) return false;
  if (a.pools.block_bytes % 16 != 0 || a.pools.u_offset % 16 != 0 || a.pools.page_bytes % 16 != 0) {
    return false;
  }
  return TileSmemBytes(a) <= 150 * 1024;
}

cudaError_t LaunchBufferedStepTile(const StepArgs& args, cudaStream_t stream) {
  const size_t smem = TileSmemBytes(args);
  if (args.max_tokens <= 1) return LaunchTile<1>(args, smem, stream);
  if (args.max_tokens <= 4) return LaunchTile<4>(args, smem, stream);
  return LaunchTile<16>(args, smem, stream);
}

}  // namespace kvbuffer::cuda
