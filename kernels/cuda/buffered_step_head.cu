// Buffered decode / verify / fold for K = V = 128 (Qwen3-Next), one block per (item, value head):
// the whole 64 KB state of the head arrives by one bulk copy (TMA engine, mbarrier) while the
// block computes row addresses, stages tokens and the decayed dot products; 4 warps then sweep the
// tile with float4 columns (lane -> 4 columns, warp -> every 4th row), so the instructions per
// state byte stay far below what the memory system needs. The fold_first race is handled as in
// buffered_step.cu (the last block of the key-head group writes the shared k^/G rows).
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/buffered_step_internal.h"
#include "kernels/cuda/common.cuh"

namespace kvbuffer::cuda {
namespace {

constexpr int kK = 128, kV = 128;
constexpr int kThreads = 128;
constexpr int kPhases = 4;     // warps; warp w sweeps rows 32 w .. 32 w + 31 (one bulk copy)
constexpr int kFoldRows = 16;  // fold rows staged per round
constexpr int kURegs = 16;     // buffer u rows prefetched into registers by warp 0

struct HeadSmem {
  int st, bar, qs, ks, vs, gi, bi, gb, dkk, dkq, red, un, rp, rs, krows, urows, misc, total;
  int rows_ld, tg;
};

__host__ __device__ inline HeadSmem MakeHeadSmem(int mmax, int nmax, bool any_fold, int es) {
  HeadSmem s;
  int o = 0;  // bytes
  auto take = [&o](int bytes) {
    const int at = o;
    o += (bytes + 127) & ~127;
    return at;
  };
  const int nr = (nmax > kFoldRows ? nmax : kFoldRows) + mmax;
  s.rows_ld = nmax + mmax;
  s.tg = mmax < 4 ? mmax : 4;
  s.st = take(kK * kV * 4);
  s.bar = take(5 * 8);
  s.qs = take(mmax * kK * 4);
  s.ks = take(mmax * kK * 4);
  s.vs = take(mmax * kV * 4);
  s.gi = take(mmax * 4);
  s.bi = take(mmax * 4);
  s.gb = take((nr + 1) * 4);
  s.dkk = take(mmax * s.rows_ld * 4);
  s.dkq = take(mmax * s.rows_ld * 4);
  s.red = take(kPhases * s.tg * 2 * kV * 4);
  s.un = take(mmax * kV * 4);
  s.rp = take(nr * 8);
  s.rs = take(nr * 4);
  s.krows = take(any_fold ? kFoldRows * kK * es : 0);
  s.urows = take(any_fold ? kFoldRows * kV * es : 0);
  s.misc = take(16);
  s.total = o;
  return s;
}

// Fences this thread's generic-proxy shared-memory accesses against later bulk copies.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Thread 0: announces and starts the four 16 KB bulk copies of one head state into St.
__device__ __forceinline__ void IssueStateCopy(float* St, const float* S, uint64_t* bar) {
  for (int q = 0; q < 4; ++q) {
    MbarExpectTx(bar + q, kK * kV);
    BulkCopy(St + q * (kK * kV / 4), S + q * (kK * kV / 4), kK * kV, bar + q);
  }
}

// One (item, value head) unit. Persistent blocks (kPersist) pass the next unit (next_item >= 0)
// so thread 0 can start its state copy as soon as this unit's state tile is no longer read;
// ph_state / ph_fold are the barrier parities, `pre` (thread 0) says this unit's copy is issued.
template <int MAXM, bool kTma, bool kPersist>
__device__ __forceinline__ void HeadUnit(const StepArgs& A, uint8_t* smem, int item_idx, int hv,
                                         int next_item, int next_hv, uint32_t& ph_state,
                                         uint32_t& ph_fold, bool& pre) {
  constexpr int K = kK, V = kV;
  const Geometry& g = A.g;
  const StepDesc it = A.items[item_idx];
  const int group = g.HV / g.H, h = hv / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c4 = 4 * lane;  // first of this lane's 4 columns
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
  const int mmax = A.max_tokens > 0 ? A.max_tokens : 1;

  const HeadSmem L = MakeHeadSmem(mmax, A.max_rows, A.any_fold, es);
  float* St = reinterpret_cast<float*>(smem + L.st);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);
  float* qs = reinterpret_cast<float*>(smem + L.qs);
  float* ks = reinterpret_cast<float*>(smem + L.ks);
  float* vs = reinterpret_cast<float*>(smem + L.vs);
  float* Gi = reinterpret_cast<float*>(smem + L.gi);
  float* bi = reinterpret_cast<float*>(smem + L.bi);
  float* gb = reinterpret_cast<float*>(smem + L.gb);
  float* dkk = reinterpret_cast<float*>(smem + L.dkk);
  float* dkq = reinterpret_cast<float*>(smem + L.dkq);
  float* red = reinterpret_cast<float*>(smem + L.red);
  float* unew = reinterpret_cast<float*>(smem + L.un);
  uint8_t** rp = reinterpret_cast<uint8_t**>(smem + L.rp);
  int* rs = reinterpret_cast<int*>(smem + L.rs);
  uint8_t* krows = smem + L.krows;
  uint8_t* urows = smem + L.urows;
  float* misc = reinterpret_cast<float*>(smem + L.misc);

  // 1. Thread 0 starts the state's bulk copies at once (a barrier per quarter); the others
  // compute the row addresses of every row the block touches.
  float* S = has_state ? StatePtr(A.pools, g, it.state_slot, A.layer, hv) : nullptr;
  const int nfold0 = fold ? min(kFoldRows, n) : 0;
  const int nr = max(nfold0, n_eff + m);
  bool next_load = false;
  const float* next_S = nullptr;
  if (kTma) {
    if (tid == 0) {
      if (load_state && !pre) IssueStateCopy(St, S, bar);
      pre = false;
      if (kPersist && next_item >= 0) {
        const StepDesc nd = A.items[next_item];
        next_load = nd.state_slot >= 0 && (nd.flags & kStateNew) == 0;
        if (next_load) next_S = StatePtr(A.pools, g, nd.state_slot, A.layer, next_hv);
      }
    }
  } else if (load_state) {
    // cp.async: each warp copies the 32 rows it will sweep.
    for (int k = 32 * warp; k < 32 * warp + 32; ++k) {
      CpAsync16(St + k * V + c4, S + static_cast<int64_t>(k) * V + c4);
    }
    CpAsyncCommit();
  }
  // Tokens, values and gates (independent of the row addresses).
  for (int idx = tid; idx < m * K / 4; idx += kThreads) {
    const int i = idx / (K / 4), c = 4 * (idx % (K / 4));
    const int64_t src = ((tok0 + i) * g.H + h) * K + c;
    *reinterpret_cast<float4*>(qs + i * K + c) = *reinterpret_cast<const float4*>(A.prep.q + src);
    *reinterpret_cast<float4*>(ks + i * K + c) = *reinterpret_cast<const float4*>(A.prep.k + src);
    *reinterpret_cast<float4*>(vs + i * V + c) =
        *reinterpret_cast<const float4*>(A.prep.v + ((tok0 + i) * g.HV + hv) * V + c);
  }
  for (int i = tid; i < m; i += kThreads) {
    Gi[i] = A.prep.G[(tok0 + i) * g.HV + hv];
    bi[i] = A.prep.beta[(tok0 + i) * g.HV + hv];
  }
  for (int j = tid; j < nr; j += kThreads) {
    int32_t slot;
    rp[j] = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, j, &slot);
    rs[j] = slot;
  }
  __syncthreads();  // row addresses, tokens and gates visible

  // 2. The first fold rows (k^ and u): bulk copies on their own barrier, or cp.async.
  if (kTma && tid == 0 && fold) {
    const uint32_t row_k = K * es, row_u = V * es;
    MbarExpectTx(bar + 4, nfold0 * (row_k + row_u));
    for (int j = 0; j < nfold0; ++j) {
      BulkCopy(krows + j * row_k, RowK(A.pools, g, rp[j], rs[j], h), row_k, bar + 4);
      BulkCopy(urows + j * row_u, RowU(A.pools, g, rp[j], rs[j], hv), row_u, bar + 4);
    }
  }
  if (!kTma && fold) {
    const int per_k = K * es / 16, per_u = V * es / 16;
    for (int idx = tid; idx < nfold0 * (per_k + per_u); idx += kThreads) {
      const int j = idx / (per_k + per_u), q = idx % (per_k + per_u);
      if (q < per_k) {
        CpAsync16(krows + (j * per_k + q) * 16,
                  static_cast<uint8_t*>(RowK(A.pools, g, rp[j], rs[j], h)) + q * 16);
      } else {
        CpAsync16(urows + (j * per_u + q - per_k) * 16,
                  static_cast<uint8_t*>(RowU(A.pools, g, rp[j], rs[j], hv)) + (q - per_k) * 16);
      }
    }
    CpAsyncCommit();
  }
  if (has_state && !load_state) {
    for (int k = 32 * warp; k < 32 * warp + 32; ++k) {
      *reinterpret_cast<float4*>(St + k * V + c4) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  // 3. Old G of the fold rows, the u rows warp 0 combines with, and the dot products.
  for (int j = tid; j < nfold0; j += kThreads) gb[j] = *RowG(A.pools, g, rp[j], rs[j], hv);
  if (fold && tid == kThreads - 1) {
    int32_t slot;
    uint8_t* blk =
        RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer, n - 1, &slot);
    misc[0] = *RowG(A.pools, g, blk, slot, hv);
  }
  float4 ureg[kURegs];
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kURegs; ++j) {
      ureg[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (j < n_eff) ureg[j] = Load4(RowU(A.pools, g, rp[j], rs[j], hv), bdt, c4);
    }
  }

  // Decayed dot products of the tokens with every earlier row; a warp loads 4 rows at once.
  const int nrows = m > 0 ? n_eff + m : 0;
  for (int j0 = warp; j0 < nrows; j0 += 16) {
    float4 kj[4];
    float gj[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + 4 * r;
      kj[r] = make_float4(0.f, 0.f, 0.f, 0.f);
      gj[r] = 0.f;
      if (j < n_eff) {
        kj[r] = Load4(RowK(A.pools, g, rp[j], rs[j], h), bdt, c4);
        gj[r] = *RowG(A.pools, g, rp[j], rs[j], hv);
      } else if (j < nrows) {
        kj[r] = *reinterpret_cast<const float4*>(ks + (j - n_eff) * K + c4);
        gj[r] = Gi[j - n_eff];
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + 4 * r;
      if (j >= nrows) break;
      for (int i = 0; i < m; ++i) {
        if (j > n_eff + i) continue;
        const float4 ki = *reinterpret_cast<const float4*>(ks + i * K + c4);
        const float4 qi = *reinterpret_cast<const float4*>(qs + i * K + c4);
        float a = kj[r].x * ki.x + kj[r].y * ki.y + kj[r].z * ki.z + kj[r].w * ki.w;
        float b = kj[r].x * qi.x + kj[r].y * qi.y + kj[r].z * qi.z + kj[r].w * qi.w;
        a = WarpSum(a);
        b = WarpSum(b);
        if (lane == 0) {
          const float d = expf(Gi[i] - gj[r]);
          dkk[i * L.rows_ld + j] = j < n_eff + i ? a * d : 0.f;
          dkq[i * L.rows_ld + j] = b * d;
        }
      }
    }
  }
  if (kTma) {
    if (load_state) {
      MbarWait(bar + warp, ph_state);  // this warp's 32 rows
      ph_state ^= 1;
    }
    if (fold) {
      MbarWait(bar + 4, ph_fold);
      ph_fold ^= 1;
    }
  } else {
    CpAsyncWaitAll();
  }
  __syncthreads();

  // 5. Fused fold: S <- e^{G_n} S + sum_j e^{G_n - G_j} k^_j u_j^T.
  int writer;
  if (fold) {
    const float Gn = misc[0];
    const float dn = expf(Gn);
    for (int j0 = 0; j0 < n; j0 += kFoldRows) {
      const int jn = min(kFoldRows, n - j0);
      if (j0 > 0) {
        __syncthreads();  // the previous rows are consumed
        const int per_k = K * es / 16, per_u = V * es / 16;
        for (int idx = tid; idx < jn * (per_k + per_u); idx += kThreads) {
          const int j = idx / (per_k + per_u), q = idx % (per_k + per_u);
          int32_t slot;
          uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                                  j0 + j, &slot);
          if (q < per_k) {
            CpAsync16(krows + (j * per_k + q) * 16,
                      static_cast<uint8_t*>(RowK(A.pools, g, blk, slot, h)) + q * 16);
          } else {
            CpAsync16(urows + (j * per_u + q - per_k) * 16,
                      static_cast<uint8_t*>(RowU(A.pools, g, blk, slot, hv)) + (q - per_k) * 16);
          }
        }
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
      float4 w[kFoldRows];
#pragma unroll
      for (int jj = 0; jj < kFoldRows; ++jj) {
        w[jj] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (jj < jn) {
          w[jj] = Load4(urows + jj * V * es, bdt, c4);
          const float cf = expf(Gn - gb[jj]);
          w[jj].x *= cf;
          w[jj].y *= cf;
          w[jj].z *= cf;
          w[jj].w *= cf;
        }
      }
      const float* kf = reinterpret_cast<const float*>(krows);
      const uint16_t* kb = reinterpret_cast<const uint16_t*>(krows);
      for (int k = 32 * warp; k < 32 * warp + 32; ++k) {
        float4 s = *reinterpret_cast<float4*>(St + k * V + c4);
        if (j0 == 0) {
          s.x *= dn;
          s.y *= dn;
          s.z *= dn;
          s.w *= dn;
        }
        if (bdt == kF32) {
#pragma unroll
          for (int jj = 0; jj < kFoldRows; ++jj) {
            if (jj < jn) Axpy4(s, kf[jj * K + k], w[jj]);
          }
        } else {
#pragma unroll
          for (int jj = 0; jj < kFoldRows; ++jj) {
            if (jj < jn) Axpy4(s, LoadElem(kb, bdt, jj * K + k), w[jj]);
          }
        }
        *reinterpret_cast<float4*>(St + k * V + c4) = s;
      }
    }
    __syncthreads();  // every old row this block reads has been read
    if (tid == 0) {
      __threadfence();
      int* counter = A.counters + static_cast<int64_t>(item_idx) * g.H + h;
      const int prev = atomicAdd(counter, 1);
      const int last = prev == group - 1;
      if (last) {
        atomicExch(counter, 0);
        __threadfence();
      }
      misc[1] = last ? 1.f : 0.f;
    }
    __syncthreads();
    writer = misc[1] != 0.f;
  } else {
    writer = hv % group == 0;
  }

  if (has_state && (fold || is_new) && !fold_after) {
    for (int k = 32 * warp; k < 32 * warp + 32; ++k) {
      __stcs(reinterpret_cast<float4*>(S + static_cast<int64_t>(k) * V + c4),
             *reinterpret_cast<const float4*>(St + k * V + c4));
    }
  }
  if (m == 0) return;

  // 6. Shared parts of the new rows: k^ of key head h, G of the group's value heads.
  if (writer && !fold_after) {
    for (int idx = tid; idx < m * K / 4; idx += kThreads) {
      const int i = idx / (K / 4), c = 4 * (idx % (K / 4));
      Store4(RowK(A.pools, g, rp[n_eff + i], rs[n_eff + i], h), bdt, c,
             *reinterpret_cast<const float4*>(ks + i * K + c));
    }
    for (int idx = tid; idx < m * group; idx += kThreads) {
      const int i = idx / group, hh = h * group + idx % group;
      *RowG(A.pools, g, rp[n_eff + i], rs[n_eff + i], hh) = A.prep.G[(tok0 + i) * g.HV + hh];
    }
  }

  // 7. Token groups of up to 4: partial p = S^T q^, r = S^T k^ per warp, then warp 0 reduces and
  // solves the tokens of the group by forward substitution (4 columns per lane).
  for (int t0 = 0; t0 < m; t0 += L.tg) {
    const int tn = min(L.tg, m - t0);
    if (has_state) {
      float4 p[4], r[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) p[t] = r[t] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int k = 32 * warp; k < 32 * warp + 32; ++k) {
        const float4 s = *reinterpret_cast<const float4*>(St + k * V + c4);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if (t < tn && t < MAXM) {
            Axpy4(p[t], qs[(t0 + t) * K + k], s);
            Axpy4(r[t], ks[(t0 + t) * K + k], s);
          }
        }
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (t < tn && t < MAXM) {
          *reinterpret_cast<float4*>(red + ((warp * L.tg + t) * 2) * V + c4) = p[t];
          *reinterpret_cast<float4*>(red + ((warp * L.tg + t) * 2 + 1) * V + c4) = r[t];
        }
      }
    }
    const bool last_read = kPersist && t0 + L.tg >= m && !(fold_after && has_state);
    if (last_read) FenceProxyAsync();
    __syncthreads();
    if (kTma && last_read && tid == 0 && next_load) {
      IssueStateCopy(St, next_S, bar);  // the next unit's state streams in during this tail
      pre = true;
    }
    if (warp == 0) {
      for (int t = 0; t < tn; ++t) {
        const int i = t0 + t;
        float4 p = make_float4(0.f, 0.f, 0.f, 0.f), r = p;
        if (has_state) {
#pragma unroll
          for (int w = 0; w < kPhases; ++w) {
            const float4 a = *reinterpret_cast<const float4*>(red + ((w * L.tg + t) * 2) * V + c4);
            const float4 b =
                *reinterpret_cast<const float4*>(red + ((w * L.tg + t) * 2 + 1) * V + c4);
            Add4(p, a);
            Add4(r, b);
          }
        }
        const float eg = expf(Gi[i]);
        float4 o = make_float4(eg * p.x, eg * p.y, eg * p.z, eg * p.w);
        float4 y = make_float4(eg * r.x, eg * r.y, eg * r.z, eg * r.w);
        const float* kk = dkk + i * L.rows_ld;
        const float* kq = dkq + i * L.rows_ld;
#pragma unroll
        for (int j = 0; j < kURegs; ++j) {
          if (j < n_eff) {
            Axpy4(y, kk[j], ureg[j]);
            Axpy4(o, kq[j], ureg[j]);
          }
        }
        for (int j = kURegs; j < n_eff; ++j) {
          const float4 uj = Load4(RowU(A.pools, g, rp[j], rs[j], hv), bdt, c4);
          Axpy4(y, kk[j], uj);
          Axpy4(o, kq[j], uj);
        }
        for (int l = 0; l < i; ++l) {
          const float4 ul = *reinterpret_cast<const float4*>(unew + l * V + c4);
          Axpy4(y, kk[n_eff + l], ul);
          Axpy4(o, kq[n_eff + l], ul);
        }
        const float4 v = *reinterpret_cast<const float4*>(vs + i * V + c4);
        const float b = bi[i];
        const float4 u =
            make_float4(b * (v.x - y.x), b * (v.y - y.y), b * (v.z - y.z), b * (v.w - y.w));
        Axpy4(o, kq[n_eff + i], u);
        *reinterpret_cast<float4*>(unew + i * V + c4) = u;
        Store4(A.out, A.out_dtype, ((tok0 + i) * g.HV + hv) * V + c4, o);
        if (!fold_after) Store4(RowU(A.pools, g, rp[n_eff + i], rs[n_eff + i], hv), bdt, c4, u);
      }
    }
    __syncthreads();
  }

  // 8. kFoldAfter: S <- e^{G_m} S + sum_i e^{G_m - G_i} k^_i u_i^T, written to the pool.
  if (fold_after && has_state) {
    const float Gm = Gi[m - 1];
    const float dm = expf(Gm);
    for (int k = 32 * warp; k < 32 * warp + 32; ++k) {
      float4 s = *reinterpret_cast<const float4*>(St + k * V + c4);
      s.x *= dm;
      s.y *= dm;
      s.z *= dm;
      s.w *= dm;
      for (int i = 0; i < m; ++i) {
        Axpy4(s, ks[i * K + k] * expf(Gm - Gi[i]),
              *reinterpret_cast<const float4*>(unew + i * V + c4));
      }
      __stcs(reinterpret_cast<float4*>(S + static_cast<int64_t>(k) * V + c4), s);
    }
  }
}

template <int MAXM, bool kTma, bool kPersist>
__global__ void __launch_bounds__(kThreads) BufferedStepHeadKernel(StepArgs A) {
  extern __shared__ __align__(128) uint8_t smem[];
  const HeadSmem L = MakeHeadSmem(A.max_tokens > 0 ? A.max_tokens : 1, A.max_rows, A.any_fold,
                                  DTypeBytes(A.pools.buffer_dtype));
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);
  if (kTma && threadIdx.x == 0) {
    for (int q = 0; q < 5; ++q) MbarInit(bar + q);
    MbarInitFence();
  }
  uint32_t ph_state = 0, ph_fold = 0;
  bool pre = false;
  if (!kPersist) {
    if (A.stagger_ns > 0) {
      const int linear = blockIdx.x + gridDim.x * blockIdx.y;
      const int wave = linear / A.num_sms;
      if (wave < 3 && wave > 0) __nanosleep(static_cast<unsigned>(wave * A.stagger_ns));
    }
    HeadUnit<MAXM, kTma, false>(A, smem, blockIdx.x, blockIdx.y, -1, 0, ph_state, ph_fold, pre);
    return;
  }
  __syncthreads();  // barriers initialised
  const int units = A.num_items * A.g.HV;
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    if (u != static_cast<int>(blockIdx.x)) {
      FenceProxyAsync();
      __syncthreads();  // the previous unit is done with every shared buffer
    }
    const int nu = u + gridDim.x;
    HeadUnit<MAXM, kTma, true>(A, smem, u % A.num_items, u / A.num_items,
                               nu < units ? nu % A.num_items : -1,
                               nu < units ? nu / A.num_items : 0, ph_state, ph_fold, pre);
  }
}

size_t HeadSmemBytes(const StepArgs& a) {
  return static_cast<size_t>(MakeHeadSmem(a.max_tokens > 0 ? a.max_tokens : 1, a.max_rows,
                                          a.any_fold, DTypeBytes(a.pools.buffer_dtype))
                                 .total);
}

int NumSms() {
  static int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 132;
    }
    return n;
  }();
  return sms;
}

template <int MAXM>
cudaError_t LaunchHead(const StepArgs& args, size_t smem, cudaStream_t stream) {
  // variant 4: persistent (v6, measured slower: bench/NOTES.md); 3: one block per unit with
  // cp.async; 0 / 5: one block per unit with bulk copies (v5, the default).
  const bool persist = args.variant == 4;
  auto* fn = args.variant == 3 ? BufferedStepHeadKernel<MAXM, false, false>
             : persist         ? BufferedStepHeadKernel<MAXM, true, true>
                               : BufferedStepHeadKernel<MAXM, true, false>;
  cudaError_t e =
      cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  if (persist) {
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem);
    if (e != cudaSuccess) return e;
    const int64_t units = static_cast<int64_t>(args.num_items) * args.g.HV;
    const int64_t blocks = std::min<int64_t>(units, std::max(per_sm, 1) * int64_t{NumSms()});
    fn<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args);
  } else {
    dim3 grid(args.num_items, args.g.HV);
    fn<<<grid, kThreads, smem, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace

bool BufferedStepHeadFits(const StepArgs& a) {
  if (a.g.K != kK || a.g.V != kV || a.max_tokens > kMaxStepTokens) return false;
  if (a.pools.block_bytes % 16 != 0 || a.pools.u_offset % 16 != 0 || a.pools.page_bytes % 16 != 0) {
    return false;
  }
  return HeadSmemBytes(a) <= 200 * 1024;
}

cudaError_t LaunchBufferedStepHead(const StepArgs& args, cudaStream_t stream) {
  const size_t smem = HeadSmemBytes(args);
  if (args.max_tokens <= 1) return LaunchHead<1>(args, smem, stream);
  if (args.max_tokens <= 4) return LaunchHead<4>(args, smem, stream);
  return LaunchHead<16>(args, smem, stream);
}

}  // namespace kvbuffer::cuda
