#include "kernels/cuda/chunked_prefill.h"
#include "kernels/cuda/common.cuh"

namespace kvbuffer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kC = kChunk;    // 64 tokens
constexpr int kLdC = kC + 8;  // padded row of 64 bf16
constexpr int kLdF = kC + 1;  // padded row of 64 fp32

// D += A B for one m16n8k16 tile, bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A fragment (16x16) at (row0, k0) of a row-major bf16 tile with leading dimension ld.
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const uint16_t* T, int ld, int row0, int k0,
                                      int lane) {
  const uint16_t* p = T + (row0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  a[0] = *reinterpret_cast<const uint32_t*>(p);
  a[1] = *reinterpret_cast<const uint32_t*>(p + 8 * ld);
  a[2] = *reinterpret_cast<const uint32_t*>(p + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(p + 8 * ld + 8);
}

// B fragment (16x8) at (k0, n0) of a B stored n-major ([n][k], k contiguous).
__device__ __forceinline__ void LoadB(uint32_t (&b)[2], const uint16_t* T, int ld, int n0, int k0,
                                      int lane) {
  const uint16_t* p = T + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  b[0] = *reinterpret_cast<const uint32_t*>(p);
  b[1] = *reinterpret_cast<const uint32_t*>(p + 8);
}

// B fragment (16x8, k x n) at (k0, n0) of a B stored row-major ([k][n], n contiguous), through
// ldmatrix.trans (lanes 0..15 address rows k0..k0+15).
__device__ __forceinline__ void LoadBT(uint32_t (&b)[2], const uint16_t* T, int ld, int k0, int n0,
                                       int lane) {
  const uint32_t addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(T + (k0 + (lane & 15)) * ld + n0));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b[0]), "=r"(b[1])
               : "r"(addr));
}

// A fragment (16x16, m x k) at (m0, k0) of an A stored transposed ([k][m], m contiguous), through
// ldmatrix.x4.trans (lanes 8q..8q+7 address the rows of matrix q).
__device__ __forceinline__ void LoadAT(uint32_t (&a)[4], const uint16_t* T, int ld, int m0, int k0,
                                       int lane) {
  const int q = lane >> 3, r = lane & 7;
  const uint32_t addr = static_cast<uint32_t>(
      __cvta_generic_to_shared(T + (k0 + r + ((q >> 1) << 3)) * ld + m0 + ((q & 1) << 3)));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

// Copies `rows` rows of `cols` bf16 (cols % 8 == 0) from global (row stride gstride elements) to
// shared (row stride ld) with cp.async, zero-filling rows >= valid. NT threads cooperate.
template <int NT>
__device__ __forceinline__ void AsyncRows(uint16_t* dst, int ld, const uint16_t* src,
                                          int64_t gstride, int rows, int valid, int cols) {
  const int per_row = cols / 8;
  for (int idx = threadIdx.x; idx < rows * per_row; idx += NT) {
    const int r = idx / per_row, c8 = idx % per_row;
    const int ok = r < valid;
    CpAsync16Zfill(dst + r * ld + c8 * 8, src + (ok ? r * gstride + c8 * 8 : 0), ok ? 16 : 0);
  }
}

template <int K, int V>
struct LocalSmem {
  static constexpr int kLdK = K + 8;
  static constexpr int kLdV = V + 8;
  static constexpr int Max(int a, int b) { return a > b ? a : b; }
  static constexpr int kKs = 0;
  static constexpr int kQa = kKs + kC * kLdK * 2;  // Qs, then Asw | Asu
  static constexpr int kVs = kQa + Max(kC * kLdK, 2 * kC * kLdC) * 2;
  static constexpr int kAf = kVs + kC * kLdV * 2;
  static constexpr int kGs = kAf + kC * kLdF * 4;
  static constexpr int kBs = kGs + kC * 4;
  static constexpr int kTotal = kBs + kC * 4;
};

// Chunk-local products of one (unit, value head).
template <int K, int V>
__global__ void __launch_bounds__(kThreads) ChunkLocalKernel(ChunkArgs A) {
  using Sm = LocalSmem<K, V>;
  constexpr int kLdK = Sm::kLdK, kLdV = Sm::kLdV;
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + Sm::kKs);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + Sm::kQa);
  uint16_t* Asw = Qs;              // A diag(beta e^G), after Qs is dead
  uint16_t* Asu = Qs + kC * kLdC;  // A diag(beta)
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + Sm::kVs);
  float* Af = reinterpret_cast<float*>(smem + Sm::kAf);
  float* Gs = reinterpret_cast<float*>(smem + Sm::kGs);
  float* bs = reinterpret_cast<float*>(smem + Sm::kBs);

  const Geometry& g = A.g;
  const int u = blockIdx.x, hv = blockIdx.y;
  const int h = hv / (g.HV / g.H);
  const ChunkUnit unit = A.units[u];
  const StepDesc it = A.items[unit.item];
  const int len = unit.len;
  const int64_t tok0 = static_cast<int64_t>(it.token_offset) + unit.t_begin;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;

  // 1. K^, Q^ and V of the chunk (cp.async, rows past len zero), gates.
  AsyncRows<kThreads>(Ks, kLdK, A.prep.kh + (tok0 * g.H + h) * K, static_cast<int64_t>(g.H) * K, kC,
                      len, K);
  AsyncRows<kThreads>(Qs, kLdK, A.prep.qh + (tok0 * g.H + h) * K, static_cast<int64_t>(g.H) * K, kC,
                      len, K);
  AsyncRows<kThreads>(Vs, kLdV, A.prep.vh + (tok0 * g.HV + hv) * V, static_cast<int64_t>(g.HV) * V,
                      kC, len, V);
  CpAsyncCommit();
  if (tid < kC) {
    const int j = tid < len ? tid : len - 1;
    Gs[tid] = A.prep.G[(tok0 + j) * g.HV + hv];
    bs[tid] = tid < len ? A.prep.beta[(tok0 + j) * g.HV + hv] : 0.f;
  }
  CpAsyncWaitAll();
  __syncthreads();

  // 2. K K^T and Q K^T: warp w owns rows 16w..16w+15. L (fp32) to smem, P (bf16) to global.
  {
    float kk[8][4], qk[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) kk[nt][e] = qk[nt][e] = 0.f;
    }
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t ak[4], aq[4];
      LoadA(ak, Ks, kLdK, 16 * warp, k0, lane);
      LoadA(aq, Qs, kLdK, 16 * warp, k0, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b[2];
        LoadB(b, Ks, kLdK, nt * 8, k0, lane);
        Mma(kk[nt], ak, b);
        Mma(qk[nt], aq, b);
      }
    }
    uint16_t* P = A.scratch.P + (static_cast<int64_t>(u) * g.HV + hv) * kC * kC;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * warp + gq + 8 * hf;
        const int j = nt * 8 + 2 * tq;
        float pv[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = j + e;
          const float d = jj <= i ? expf(Gs[i] - Gs[jj]) : 0.f;
          Af[i * kLdF + jj] = jj < i ? bs[i] * d * kk[nt][2 * hf + e] : 0.f;
          pv[e] = d * qk[nt][2 * hf + e];
        }
        *reinterpret_cast<uint32_t*>(P + i * kC + j) = PackBf16(pv[0], pv[1]);
      }
    }
  }
  __syncthreads();  // Qs dead from here

  // 3. A = (I + L)^-1: column c of A depends only on column c of earlier rows; two threads per
  // column hold its even and odd rows and combine each row's sum with one shuffle. Written scaled
  // by the column's beta e^G (Asw) and beta (Asu), in bf16.
  {
    const int c = tid >> 1, par = tid & 1;
    const float sw = bs[c] * expf(Gs[c]), su = bs[c];
    float ap[kC / 2];
#pragma unroll
    for (int q = 0; q < kC / 2; ++q) ap[q] = 0.f;
#pragma unroll
    for (int i = 0; i < kC; ++i) {
      float v0 = 0.f, v1 = 0.f;
#pragma unroll
      for (int q = 0; q < kC / 2; q += 2) {
        if (2 * q < i) {
          const int j0 = 2 * q + par, j1 = 2 * q + 2 + par;
          if (j0 < i) v0 = fmaf(Af[i * kLdF + j0], ap[q], v0);
          if (j1 < i) v1 = fmaf(Af[i * kLdF + j1], ap[q + 1], v1);
        }
      }
      float v = v0 + v1;
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      const float ai = i > c ? -v : (i == c ? 1.f : 0.f);
      if ((i & 1) == par) ap[i >> 1] = ai;
      if (par == 0) {
        Asw[i * kLdC + c] = FloatToBf16(ai * sw);
      } else {
        Asu[i * kLdC + c] = FloatToBf16(ai * su);
      }
    }
  }
  __syncthreads();

  // 4. W = A diag(beta e^G) K^ and U = A diag(beta) V (B operands through ldmatrix.trans).
  {
    float acc[K / 8][4];
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    }
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 16) {
      uint32_t a[4];
      LoadA(a, Asw, kLdC, 16 * warp, k0, lane);
#pragma unroll
      for (int nt = 0; nt < K / 8; ++nt) {
        uint32_t b[2];
        LoadBT(b, Ks, kLdK, k0, nt * 8, lane);
        Mma(acc[nt], a, b);
      }
    }
    uint16_t* W = A.scratch.W + (static_cast<int64_t>(u) * g.HV + hv) * kC * K;
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * warp + gq + 8 * hf;
        *reinterpret_cast<uint32_t*>(W + i * K + nt * 8 + 2 * tq) =
            PackBf16(acc[nt][2 * hf], acc[nt][2 * hf + 1]);
      }
    }
  }
  {
    float acc[V / 8][4];
#pragma unroll
    for (int nt = 0; nt < V / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    }
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 16) {
      uint32_t a[4];
      LoadA(a, Asu, kLdC, 16 * warp, k0, lane);
#pragma unroll
      for (int nt = 0; nt < V / 8; ++nt) {
        uint32_t b[2];
        LoadBT(b, Vs, kLdV, k0, nt * 8, lane);
        Mma(acc[nt], a, b);
      }
    }
    uint16_t* U = A.scratch.U + (static_cast<int64_t>(u) * g.HV + hv) * kC * V;
#pragma unroll
    for (int nt = 0; nt < V / 8; ++nt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * warp + gq + 8 * hf;
        *reinterpret_cast<uint32_t*>(U + i * V + nt * 8 + 2 * tq) =
            PackBf16(acc[nt][2 * hf], acc[nt][2 * hf + 1]);
      }
    }
  }
}

// Warps of the sequential kernel: 16 for V >= 128 (more warps hide the per-chunk latency chain),
// else 8. Four warps share the 64 token rows; the rest split the value columns.
__host__ __device__ constexpr int StateWarps(int V) { return V >= 128 ? 16 : 8; }

template <int K, int V>
struct StateSmem {
  static constexpr int kLdK = K + 8;
  static constexpr int kLdV = V + 8;
  // One pipeline stage: W, Q^, raw K^ rows [64][K], P [64][64], G [64].
  static constexpr int kWs = 0;
  static constexpr int kQs = kWs + kC * kLdK * 2;
  static constexpr int kKr = kQs + kC * kLdK * 2;
  static constexpr int kPs = kKr + kC * kLdK * 2;
  static constexpr int kGs = kPs + kC * kLdC * 2;
  static constexpr int kStage = kGs + kC * 4;
  static constexpr int kSs = 2 * kStage;           // S in bf16, row-major [K][V]
  static constexpr int kVn = kSs + K * kLdV * 2;   // V_new [64][V]
  static constexpr int kVd = kVn + kC * kLdV * 2;  // V_new scaled by e^{G_last - G} [64][V]
  static constexpr int kTotal = kVd + kC * kLdV * 2;
};

// Sequential pass over one chunked item's units for one value head (all V columns), 8 warps,
// the next chunk's W, Q^, K^, P prefetched by cp.async while the current one computes.
template <int K, int V>
__global__ void __launch_bounds__(StateWarps(V) * 32, 1) ChunkStateKernel(ChunkArgs A) {
  constexpr int kWarps = StateWarps(V);
  constexpr int kStateThreads = kWarps * 32;
  using Sm = StateSmem<K, V>;
  constexpr int kLdK = Sm::kLdK, kLdV = Sm::kLdV;
  constexpr int MT = K / 16, NT = V / 8;
  constexpr int kTiles = MT * NT, TPW = (kTiles + kWarps - 1) / kWarps;
  constexpr int kColGroups = kWarps / 4;
  constexpr int NTW = V / kColGroups / 8;  // n-tiles per warp in the token-row products
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* Ss = reinterpret_cast<uint16_t*>(smem + Sm::kSs);
  uint16_t* VNs = reinterpret_cast<uint16_t*>(smem + Sm::kVn);
  uint16_t* VNd = reinterpret_cast<uint16_t*>(smem + Sm::kVd);

  const Geometry& g = A.g;
  const ChunkItem ci = A.chunk_items[blockIdx.x];
  const StepDesc it = A.items[ci.item];
  const int hv = blockIdx.y;
  const int group = g.HV / g.H, h = hv / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int rw = warp & 3;                        // token rows 16 rw .. 16 rw + 15
  const int cw = (warp >> 2) * (V / kColGroups);  // first column of this warp's group
  const int bdt = A.pools.buffer_dtype;
  float* S = StatePtr(A.pools, g, it.state_slot, A.layer, hv);

  auto stage_ptr = [&](int s, int off) { return smem + s * Sm::kStage + off; };
  auto issue = [&](int u, int s) {
    const ChunkUnit un = A.units[u];
    const int64_t t0 = static_cast<int64_t>(it.token_offset) + un.t_begin;
    AsyncRows<kStateThreads>(reinterpret_cast<uint16_t*>(stage_ptr(s, Sm::kWs)), kLdK,
                             A.scratch.W + (static_cast<int64_t>(u) * g.HV + hv) * kC * K, K, kC,
                             kC, K);
    AsyncRows<kStateThreads>(reinterpret_cast<uint16_t*>(stage_ptr(s, Sm::kQs)), kLdK,
                             A.prep.qh + (t0 * g.H + h) * K, static_cast<int64_t>(g.H) * K, kC,
                             un.len, K);
    AsyncRows<kStateThreads>(reinterpret_cast<uint16_t*>(stage_ptr(s, Sm::kKr)), kLdK,
                             A.prep.kh + (t0 * g.H + h) * K, static_cast<int64_t>(g.H) * K, kC,
                             un.len, K);
    AsyncRows<kStateThreads>(reinterpret_cast<uint16_t*>(stage_ptr(s, Sm::kPs)), kLdC,
                             A.scratch.P + (static_cast<int64_t>(u) * g.HV + hv) * kC * kC, kC, kC,
                             kC, kC);
    CpAsyncCommit();
  };
  auto load_g = [&](int u) -> float {
    const ChunkUnit un = A.units[u];
    const int64_t t0 = static_cast<int64_t>(it.token_offset) + un.t_begin;
    const int j = tid < un.len ? tid : un.len - 1;
    return tid < kC ? A.prep.G[(t0 + j) * g.HV + hv] : 0.f;
  };

  // State [K][V] as mma accumulators: warp tile t = warp * TPW + i, (mt, nt) = (t/NT, t%NT).
  float sacc[TPW][4];
  const bool load = !(it.flags & kStateNew);
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int t = warp * TPW + i;
#pragma unroll
    for (int e = 0; e < 4; ++e) sacc[i][e] = 0.f;
    if (t < kTiles && load) {
      const int mt = t / NT, nt = t % NT;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = mt * 16 + gq + 8 * hf, c = nt * 8 + 2 * tq;
        const float2 v = *reinterpret_cast<const float2*>(S + static_cast<int64_t>(r) * V + c);
        sacc[i][2 * hf] = v.x;
        sacc[i][2 * hf + 1] = v.y;
      }
    }
  }
  auto store_state = [&]() {
#pragma unroll
    for (int i = 0; i < TPW; ++i) {
      const int t = warp * TPW + i;
      if (t < kTiles) {
        const int mt = t / NT, nt = t % NT;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = mt * 16 + gq + 8 * hf, c = nt * 8 + 2 * tq;
          *reinterpret_cast<float2*>(S + static_cast<int64_t>(r) * V + c) =
              make_float2(sacc[i][2 * hf], sacc[i][2 * hf + 1]);
        }
      }
    }
  };
  if (ci.unit_fold_end == ci.unit_begin && (it.flags & kStateNew)) store_state();
  if (ci.unit_begin >= ci.unit_end) return;

  issue(ci.unit_begin, 0);
  {
    const float g0 = load_g(ci.unit_begin);
    if (tid < kC) reinterpret_cast<float*>(stage_ptr(0, Sm::kGs))[tid] = g0;
  }
  float goff = 0.f;  // G of the tail rows before the current tail chunk, relative to fold_tokens
  for (int u = ci.unit_begin; u < ci.unit_end; ++u) {
    const int s = (u - ci.unit_begin) & 1;
    const bool has_next = u + 1 < ci.unit_end;
    if (has_next) {
      issue(u + 1, s ^ 1);
      CpAsyncWaitAllButOne();
    } else {
      CpAsyncWaitAll();
    }
    const float gnext = has_next ? load_g(u + 1) : 0.f;
    // S in bf16, row-major, for the W S and Q S products.
#pragma unroll
    for (int i = 0; i < TPW; ++i) {
      const int t = warp * TPW + i;
      if (t < kTiles) {
        const int mt = t / NT, nt = t % NT;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = mt * 16 + gq + 8 * hf, c = nt * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(Ss + r * kLdV + c) =
              PackBf16(sacc[i][2 * hf], sacc[i][2 * hf + 1]);
        }
      }
    }
    const ChunkUnit unit = A.units[u];
    const int len = unit.len;
    const int64_t tok0 = static_cast<int64_t>(it.token_offset) + unit.t_begin;
    // U of this warp's rows and columns, in flight during the products below.
    const uint16_t* Ug = A.scratch.U + (static_cast<int64_t>(u) * g.HV + hv) * kC * V;
    uint32_t ureg[NTW][2];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * rw + gq + 8 * hf, c = cw + nt * 8 + 2 * tq;
        ureg[nt][hf] = *reinterpret_cast<const uint32_t*>(Ug + i * V + c);
      }
    }
    __syncthreads();
    const uint16_t* Ws = reinterpret_cast<const uint16_t*>(stage_ptr(s, Sm::kWs));
    const uint16_t* Qs = reinterpret_cast<const uint16_t*>(stage_ptr(s, Sm::kQs));
    const uint16_t* Kr = reinterpret_cast<const uint16_t*>(stage_ptr(s, Sm::kKr));
    const uint16_t* Ps = reinterpret_cast<const uint16_t*>(stage_ptr(s, Sm::kPs));
    const float* Gs = reinterpret_cast<const float*>(stage_ptr(s, Sm::kGs));
    const float glast = Gs[len - 1];

    // W S and Q S for rows 16 rw.., columns cw..cw+V/2; V_new = U - W S.
    float ws[NTW][4], qs[NTW][4];
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ws[nt][e] = qs[nt][e] = 0.f;
    }
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t aw[4], aq[4];
      LoadA(aw, Ws, kLdK, 16 * rw, k0, lane);
      LoadA(aq, Qs, kLdK, 16 * rw, k0, lane);
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt) {
        uint32_t b[2];
        LoadBT(b, Ss, kLdV, k0, cw + nt * 8, lane);
        Mma(ws[nt], aw, b);
        Mma(qs[nt], aq, b);
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = 16 * rw + gq + 8 * hf;
      const float eg = expf(Gs[i]);
      const float dd = i < len ? expf(glast - Gs[i]) : 0.f;
      int32_t slot = 0;
      uint8_t* blk = nullptr;
      const bool tail_row = unit.tail && i < len;
      if (tail_row) {
        blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                       unit.t_begin - it.fold_tokens + i, &slot);
      }
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt) {
        const int c = cw + nt * 8 + 2 * tq;
        const uint32_t up = ureg[nt][hf];
        float vn0 = Bf16ToFloat(static_cast<uint16_t>(up & 0xffffu)) - ws[nt][2 * hf];
        float vn1 = Bf16ToFloat(static_cast<uint16_t>(up >> 16)) - ws[nt][2 * hf + 1];
        if (i >= len) vn0 = vn1 = 0.f;
        qs[nt][2 * hf] *= eg;
        qs[nt][2 * hf + 1] *= eg;
        *reinterpret_cast<uint32_t*>(VNs + i * kLdV + c) = PackBf16(vn0, vn1);
        *reinterpret_cast<uint32_t*>(VNd + i * kLdV + c) = PackBf16(vn0 * dd, vn1 * dd);
        if (tail_row) {
          void* urow = RowU(A.pools, g, blk, slot, hv);
          StoreElem(urow, bdt, c, vn0);
          StoreElem(urow, bdt, c + 1, vn1);
        }
      }
    }
    __syncthreads();

    // O = e^G Q S + P V_new.
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 16) {
      uint32_t a[4];
      LoadA(a, Ps, kLdC, 16 * rw, k0, lane);
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt) {
        uint32_t b[2];
        LoadBT(b, VNs, kLdV, k0, cw + nt * 8, lane);
        Mma(qs[nt], a, b);
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = 16 * rw + gq + 8 * hf;
      if (i < len) {
        const int64_t o = ((tok0 + i) * g.HV + hv) * V;
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
          const int c = cw + nt * 8 + 2 * tq;
          if (A.out_dtype == kBF16) {
            *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(A.out) + o + c) =
                PackBf16(qs[nt][2 * hf], qs[nt][2 * hf + 1]);
          } else {
            StoreElem(A.out, A.out_dtype, o + c, qs[nt][2 * hf]);
            StoreElem(A.out, A.out_dtype, o + c + 1, qs[nt][2 * hf + 1]);
          }
        }
      }
    }

    // Tail rows: k^ (one block per key head) and G, relative to the state at fold_tokens.
    if (unit.tail) {
      const int parts = hv % group == 0 ? K + 1 : 1;
      for (int idx = tid; idx < len * parts; idx += kStateThreads) {
        const int j = idx % len, part = idx / len;
        int32_t slot;
        uint8_t* blk = RowBlock(A.pools, A.page_table, it.page_offset, g.page_tokens, A.layer,
                                unit.t_begin - it.fold_tokens + j, &slot);
        if (part == 0) {
          *RowG(A.pools, g, blk, slot, hv) = goff + Gs[j];
        } else {
          StoreElem(RowK(A.pools, g, blk, slot, h), bdt, part - 1,
                    Bf16ToFloat(Kr[j * kLdK + part - 1]));
        }
      }
      goff += glast;
    }

    // S <- e^{G_last} S + K^T (diag(e^{G_last - G}) V_new), unless nothing reads it any more.
    const bool fold_end = u == ci.unit_fold_end - 1;
    if (fold_end || has_next) {
      const float dc = expf(glast);
#pragma unroll
      for (int i = 0; i < TPW; ++i) {
        const int t = warp * TPW + i;
        if (t < kTiles) {
          const int mt = t / NT, nt = t % NT;
#pragma unroll
          for (int e = 0; e < 4; ++e) sacc[i][e] *= dc;
#pragma unroll
          for (int k0 = 0; k0 < kC; k0 += 16) {
            uint32_t a[4], b[2];
            LoadAT(a, Kr, kLdK, mt * 16, k0, lane);
            LoadBT(b, VNd, kLdV, k0, nt * 8, lane);
            Mma(sacc[i], a, b);
          }
        }
      }
    }
    if (fold_end) store_state();
    if (has_next && tid < kC) reinterpret_cast<float*>(stage_ptr(s ^ 1, Sm::kGs))[tid] = gnext;
    __syncthreads();
  }
}

template <int K, int V>
cudaError_t LaunchLocal(const ChunkArgs& args, cudaStream_t stream) {
  constexpr int smem = LocalSmem<K, V>::kTotal;
  auto* fn = ChunkLocalKernel<K, V>;
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(args.num_units, args.g.HV);
  fn<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <int K, int V>
cudaError_t LaunchState(const ChunkArgs& args, cudaStream_t stream) {
  constexpr int smem = StateSmem<K, V>::kTotal;
  auto* fn = ChunkStateKernel<K, V>;
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(args.num_chunk_items, args.g.HV);
  fn<<<grid, StateWarps(V) * 32, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

bool ChunkedPrefillSupported(int32_t K, int32_t V) {
  return K == V && (K == 16 || K == 32 || K == 64 || K == 128);
}

cudaError_t LaunchChunkLocal(const ChunkArgs& args, cudaStream_t stream) {
  if (args.num_units == 0) return cudaSuccess;
  const int K = args.g.K, V = args.g.V;
  if (K == 128 && V == 128) return LaunchLocal<128, 128>(args, stream);
  if (K == 64 && V == 64) return LaunchLocal<64, 64>(args, stream);
  if (K == 32 && V == 32) return LaunchLocal<32, 32>(args, stream);
  if (K == 16 && V == 16) return LaunchLocal<16, 16>(args, stream);
  return cudaErrorNotSupported;
}

cudaError_t LaunchChunkState(const ChunkArgs& args, cudaStream_t stream) {
  if (args.num_chunk_items == 0) return cudaSuccess;
  const int K = args.g.K, V = args.g.V;
  if (K == 128 && V == 128) return LaunchState<128, 128>(args, stream);
  if (K == 64 && V == 64) return LaunchState<64, 64>(args, stream);
  if (K == 32 && V == 32) return LaunchState<32, 32>(args, stream);
  if (K == 16 && V == 16) return LaunchState<16, 16>(args, stream);
  return cudaErrorNotSupported;
}

cudaError_t LaunchChunkedPrefill(const ChunkArgs& args, cudaStream_t stream) {
  cudaError_t e = LaunchChunkLocal(args, stream);
  if (e != cudaSuccess) return e;
  return LaunchChunkState(args, stream);
}

}  // namespace kvbuffer::cuda
