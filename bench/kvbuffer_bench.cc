// kvbuffer-bench: times, in one run on one card, the recurrent decode kernel (baseline), KVBuffer
// buffered decode averaged over whole flush cycles, the standalone flush, verify of m drafts and
// the tensor-core chunked prefill, at Qwen3-Next shapes (H=16, HV=32, K=V=128, W=4; one layer),
// fp32 state, bf16 activations. Medians of CUDA-event timings after warm-up; the state slots
// rotate so that L2 does not hold them; random data; every output checked for being written.
// Writes a JSON file (--out) and prints a table.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "bench/bench_kernels.h"
#include "kernels/cuda/buffered_step.h"
#include "kernels/cuda/chunked_prefill.h"
#include "kernels/cuda/recurrent_decode.h"
#include "kernels/cuda/token_prep.h"

namespace kvbuffer::bench {
namespace {

namespace kc = ::kvbuffer::cuda;

#define CK(expr)                                                                \
  do {                                                                          \
    const cudaError_t e_ = (expr);                                              \
    if (e_ != cudaSuccess) {                                                    \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(e_));                                     \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

float Bf16ToFloat(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

struct Events {
  cudaEvent_t a, b;
  Events() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
  ~Events() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
};

template <typename T>
T* Upload(const std::vector<T>& v, T* dst = nullptr) {
  if (dst == nullptr) CK(cudaMalloc(&dst, std::max<size_t>(v.size(), 1) * sizeof(T)));
  CK(cudaMemcpy(dst, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dst;
}

constexpr int kSlots = 1536;     // state slots of the pool (3 GiB of fp32 states)
constexpr int kPagesPerSeq = 3;  // 48 rows of 16 per sequence
constexpr int kPageTokens = 16;
constexpr int kMaxDrafts = 8;
constexpr int kMaxTokens = 512 * kMaxDrafts;

struct DecodeResult {
  int B = 0;
  double recurrent_tile_us = 0, recurrent_reg_us = 0;
  double recurrent_us = 0, buffered_us = 0, flush_us = 0, verify4_us = 0, prep_us = 0;
  double fold_step_us = 0;        // the step of the cycle that folds
  std::vector<double> verify_us;  // m = 1, 2, 4, 8
};

struct ConfigResult {
  int32_t dtype = kc::kF32;
  int C = 16;
  std::vector<DecodeResult> rows;
};

struct PrefillResult {
  int B = 0, T = 0;
  double ms = 0, mtok_s = 0, rel_err = -1;
  double prep_ms = 0, local_ms = 0, state_ms = 0;
};

class Bench {
 public:
  Bench() {
    g_.H = 16;
    g_.HV = 32;
    g_.K = 128;
    g_.V = 128;
    g_.W = 4;
    g_.L = 1;
    g_.channels = 2 * g_.H * g_.K + g_.HV * g_.V;
    g_.page_tokens = kPageTokens;
    g_.max_drafts = kMaxDrafts;
    CK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    state_bytes_ = static_cast<size_t>(g_.HV) * g_.K * g_.V * 4;
    CK(cudaMalloc(&pools_.states, state_bytes_ * kSlots));
    CK(LaunchFillUniform(pools_.states, state_bytes_ / 4 * kSlots, 1, -0.05f, 0.05f, stream_));
    pools_.buffer_dtype = kc::kF32;
    kc::ComputePageLayout(g_, &pools_);
    CK(cudaMalloc(&pools_.pages, pools_.page_bytes * kSlots * kPagesPerSeq));
    const size_t conv_elems = static_cast<size_t>(kSlots) * (g_.W - 1 + kMaxDrafts) * g_.channels;
    CK(cudaMalloc(&pools_.conv, conv_elems * 4));
    pools_.conv_dtype = kc::kF32;
    CK(LaunchFillUniform(static_cast<float*>(pools_.conv), conv_elems, 2, -1.f, 1.f, stream_));
    std::vector<int32_t> pt(kSlots * kPagesPerSeq);
    for (size_t i = 0; i < pt.size(); ++i) pt[i] = static_cast<int32_t>(i);
    page_table_ = Upload(pt);
    // Layer weights.
    std::vector<float> w(static_cast<size_t>(g_.channels) * g_.W), alog(g_.HV), dtb(g_.HV);
    uint64_t s = 12345;
    auto rnd = [&s]() {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      return static_cast<float>((s >> 40) & 0xffffff) / 16777216.0f;
    };
    for (float& x : w) x = (2 * rnd() - 1) * 0.5f;
    for (int h = 0; h < g_.HV; ++h) {
      alog[h] = std::log(1.0f + 15.0f * rnd());
      const float dt = 0.001f * std::pow(100.0f, rnd());
      dtb[h] = std::log(std::expm1(dt));
    }
    weights_.conv_w = Upload(w);
    weights_.a_log = Upload(alog);
    weights_.dt_bias = Upload(dtb);
    // Activations (bf16) and scratch.
    CK(cudaMalloc(&qkv_, static_cast<size_t>(kMaxTokens) * g_.channels * 2));
    CK(cudaMalloc(&a_, static_cast<size_t>(kMaxTokens) * g_.HV * 2));
    CK(cudaMalloc(&b_, static_cast<size_t>(kMaxTokens) * g_.HV * 2));
    CK(LaunchFillUniformTyped(qkv_, kc::kBF16, static_cast<size_t>(kMaxTokens) * g_.channels, 3,
                              -2.f, 2.f, stream_));
    CK(LaunchFillUniformTyped(a_, kc::kBF16, static_cast<size_t>(kMaxTokens) * g_.HV, 4, -2.f, 2.f,
                              stream_));
    CK(LaunchFillUniformTyped(b_, kc::kBF16, static_cast<size_t>(kMaxTokens) * g_.HV, 5, -2.f, 2.f,
                              stream_));
    const size_t HK = static_cast<size_t>(g_.H) * g_.K, HVV = static_cast<size_t>(g_.HV) * g_.V;
    float* scratch = nullptr;
    CK(cudaMalloc(&scratch, kMaxTokens * (2 * HK + HVV + 2 * g_.HV) * 4));
    prep_.q = scratch;
    prep_.k = prep_.q + kMaxTokens * HK;
    prep_.v = prep_.k + kMaxTokens * HK;
    prep_.G = prep_.v + kMaxTokens * HVV;
    prep_.beta = prep_.G + kMaxTokens * g_.HV;
    out_bytes_ = static_cast<size_t>(kMaxTokens) * HVV * 2;
    CK(cudaMalloc(&out_, out_bytes_));
    CK(cudaMalloc(&counters_, kSlots * g_.H * sizeof(int32_t)));
    CK(cudaMemset(counters_, 0, kSlots * g_.H * sizeof(int32_t)));
    CK(cudaMalloc(&descs_, kSlots * kMaxDrafts * sizeof(kc::StepDesc)));
    CK(cudaMalloc(&units_, kSlots * kMaxDrafts * sizeof(kc::PrepUnit)));
    CK(cudaMalloc(&slots_, kSlots * sizeof(int32_t)));
    CK(cudaMalloc(&sink_, 1 << 20));
    CK(cudaStreamSynchronize(stream_));
  }

  const kc::Geometry& geometry() const { return g_; }
  size_t state_bytes() const { return state_bytes_; }

  // Copy and read bandwidth of the card (TB/s), large buffers, medians of 20.
  void MeasureBandwidth(double* copy_tbps, double* read_tbps) {
    const size_t bytes = size_t(2) << 30;
    float4 *src, *dst;
    CK(cudaMalloc(&src, bytes));
    CK(cudaMalloc(&dst, bytes));
    CK(LaunchFillUniform(reinterpret_cast<float*>(src), bytes / 4, 9, -1, 1, stream_));
    const size_t n = bytes / 16;
    Events ev;
    std::vector<double> tc, tr;
    for (int i = 0; i < 25; ++i) {
      CK(cudaEventRecord(ev.a, stream_));
      CK(LaunchCopy(src, dst, n, stream_));
      CK(cudaEventRecord(ev.b, stream_));
      CK(cudaEventSynchronize(ev.b));
      float ms;
      CK(cudaEventElapsedTime(&ms, ev.a, ev.b));
      if (i >= 5) tc.push_back(ms);
      CK(cudaEventRecord(ev.a, stream_));
      CK(LaunchRead(src, n, sink_, stream_));
      CK(cudaEventRecord(ev.b, stream_));
      CK(cudaEventSynchronize(ev.b));
      CK(cudaEventElapsedTime(&ms, ev.a, ev.b));
      if (i >= 5) tr.push_back(ms);
    }
    *copy_tbps = 2.0 * bytes / (Median(tc) * 1e-3) / 1e12;
    *read_tbps = 1.0 * bytes / (Median(tr) * 1e-3) / 1e12;
    CK(cudaFree(src));
    CK(cudaFree(dst));
  }

  // Switches the page layout to `dtype` and refills the pages with random rows.
  void SetBufferDtype(int32_t dtype) {
    pools_.buffer_dtype = dtype;
    kc::ComputePageLayout(g_, &pools_);
    CK(LaunchInitPages(g_, pools_, kSlots * kPagesPerSeq, kPagesPerSeq, 77, stream_));
    CK(cudaStreamSynchronize(stream_));
  }

  // One timed variant over rotating slot sets: m tokens per item, n buffer rows, flags.
  // kind: 0 = recurrent, 1 = buffered step, 2 = prep only.
  int stagger_ns = 0;
  int step_variant = 0;  // buffered-kernel variant Decode uses (kc::StepArgs::variant)
  double TimeVariant(int kind, int B, int m, int n, int flags, bool check_out, int variant = 0) {
    const int sets = std::min(kSlots / B, 128);
    std::vector<kc::StepDesc> d(static_cast<size_t>(sets) * B);
    std::vector<kc::PrepUnit> u(d.size());
    std::vector<int32_t> slot_ids(d.size());
    for (int s = 0; s < sets; ++s) {
      for (int b = 0; b < B; ++b) {
        const int i = s * B + b, slot = s * B + b;
        d[i].token_offset = b * m;
        d[i].num_tokens = m;
        d[i].state_slot = kind == 3 ? -1 : slot;
        d[i].flags = flags;
        d[i].buffer_rows = n;
        d[i].page_offset = slot * kPagesPerSeq;
        d[i].conv_slot = slot;
        u[i] = {b, 0, m, (flags & kc::kVerify) ? kc::kStoreDrafts : kc::kInlineWindow};
        slot_ids[i] = slot;
      }
    }
    Upload(d, descs_);
    Upload(u, units_);
    Upload(slot_ids, slots_);
    const int iters = B <= 64 ? 60 : 30;
    const int warm = std::min(sets, 8);
    Events ev;
    std::vector<double> t;
    for (int it = 0; it < warm + iters; ++it) {
      const int s = it % sets;
      CK(cudaMemsetAsync(out_, 0xff, static_cast<size_t>(B) * m * g_.HV * g_.V * 2, stream_));
      kc::PrepArgs pa = PrepFor(s, B, m);
      if (kind != 2 && m > 0) CK(kc::LaunchTokenPrep(pa, stream_));
      CK(LaunchDelay(20, stream_));
      CK(cudaEventRecord(ev.a, stream_));
      if (kind == 0) {
        kc::RecurrentArgs ra;
        ra.g = g_;
        ra.slots = slots_ + s * B;
        ra.batch = B;
        ra.pools = pools_;
        ra.prep = prep_;
        ra.out = out_;
        ra.out_dtype = kc::kBF16;
        ra.variant = variant;
        CK(kc::LaunchRecurrentDecode(ra, stream_));
      } else if (kind == 1 || kind == 3) {
        kc::StepArgs sa;
        sa.g = g_;
        sa.items = descs_ + s * B;
        sa.num_items = B;
        sa.page_table = page_table_;
        sa.pools = pools_;
        sa.prep = prep_;
        sa.out = out_;
        sa.out_dtype = kc::kBF16;
        sa.counters = counters_;
        sa.max_tokens = m;
        sa.max_rows = (flags & kc::kFoldFirst) ? 0 : n;
        sa.any_fold = (flags & kc::kFoldFirst) != 0;
        sa.variant = variant;
        sa.stagger_ns = stagger_ns;
        if (m <= kc::kStreamMaxTokens && n <= kc::kStreamMaxRows) {  // streaming items
          sa.stream_begin = 0;
          sa.stream_fold_end = (flags & kc::kFoldFirst) ? B : 0;
          sa.stream_max_tokens = m;
          sa.stream_max_rows = n;
        }
        CK(kc::LaunchBufferedStep(sa, stream_));
      } else {
        CK(kc::LaunchTokenPrep(pa, stream_));
      }
      CK(cudaEventRecord(ev.b, stream_));
      CK(cudaEventSynchronize(ev.b));
      float ms;
      CK(cudaEventElapsedTime(&ms, ev.a, ev.b));
      if (it >= warm) t.push_back(ms * 1e3);
    }
    CK(cudaGetLastError());
    if (check_out && kind != 2 && m > 0) CheckOutputs(static_cast<size_t>(B) * m);
    return Median(t);
  }

  // Every output of the last iteration was written (poisoned with NaN before) and is finite.
  void CheckOutputs(size_t tokens) {
    std::vector<uint16_t> h(tokens * g_.HV * g_.V);
    CK(cudaMemcpy(h.data(), out_, h.size() * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < h.size(); ++i) {
      if (!std::isfinite(Bf16ToFloat(h[i]))) {
        std::fprintf(stderr, "output %zu of %zu not written or not finite\n", i, h.size());
        std::exit(2);
      }
    }
    ++outputs_checked_;
  }

  DecodeResult Decode(int B, int C, bool with_recurrent) {
    DecodeResult r;
    r.B = B;
    if (with_recurrent) {
      r.recurrent_tile_us = TimeVariant(0, B, 1, 0, 0, true, 0);
      r.recurrent_reg_us = TimeVariant(0, B, 1, 0, 0, true, 1);
      r.recurrent_us = std::min(r.recurrent_tile_us, r.recurrent_reg_us);
      r.prep_us = TimeVariant(2, B, 1, 0, 0, false);
    }
    double sum = 0;
    for (int i = 0; i < C; ++i) {
      const int n = i == 0 ? C : i;
      const double us = TimeVariant(1, B, 1, n, i == 0 ? kc::kFoldFirst : 0, true, step_variant);
      if (i == 0) r.fold_step_us = us;
      sum += us;
    }
    r.buffered_us = sum / C;
    r.flush_us = TimeVariant(1, B, 0, C, kc::kFoldFirst, false, step_variant);
    for (int m : {1, 2, 4, 8}) {
      const int n = std::max(0, std::min(C / 2, C - m));
      r.verify_us.push_back(TimeVariant(1, B, m, n, kc::kVerify, true, step_variant));
    }
    r.verify4_us = r.verify_us[2];
    return r;
  }

  // Buffered decode reproduces recurrent decode on the same tokens (C steps, then a fold step).
  double Consistency(int B, int C) {
    const int A0 = 0, B0 = B;  // slot ranges
    CK(cudaMemcpy(pools_.states + static_cast<size_t>(B0) * state_bytes_ / 4,
                  pools_.states + static_cast<size_t>(A0) * state_bytes_ / 4, B * state_bytes_,
                  cudaMemcpyDeviceToDevice));
    const size_t conv_slot = static_cast<size_t>(g_.W - 1 + kMaxDrafts) * g_.channels * 4;
    CK(cudaMemcpy(static_cast<uint8_t*>(pools_.conv) + B0 * conv_slot,
                  static_cast<uint8_t*>(pools_.conv) + A0 * conv_slot, B * conv_slot,
                  cudaMemcpyDeviceToDevice));
    const size_t outn = static_cast<size_t>(B) * g_.HV * g_.V;
    std::vector<uint16_t> o1(outn), o2(outn);
    double worst = 0;
    for (int t = 0; t <= C; ++t) {
      CK(LaunchFillUniformTyped(qkv_, kc::kBF16, static_cast<size_t>(B) * g_.channels, 100 + t,
                                -2.f, 2.f, stream_));
      CK(LaunchFillUniformTyped(a_, kc::kBF16, static_cast<size_t>(B) * g_.HV, 200 + t, -2.f, 2.f,
                                stream_));
      for (int pass = 0; pass < 2; ++pass) {
        std::vector<kc::StepDesc> d(B);
        std::vector<kc::PrepUnit> u(B);
        std::vector<int32_t> sl(B);
        for (int b = 0; b < B; ++b) {
          const int slot = (pass == 0 ? A0 : B0) + b;
          d[b].token_offset = b;
          d[b].num_tokens = 1;
          d[b].state_slot = slot;
          d[b].buffer_rows = pass == 0 ? 0 : t;
          d[b].flags = (pass == 1 && t == C) ? kc::kFoldFirst : 0;
          d[b].page_offset = slot * kPagesPerSeq;
          d[b].conv_slot = slot;
          u[b] = {b, 0, 1, kc::kInlineWindow};
          sl[b] = slot;
        }
        Upload(d, descs_);
        Upload(u, units_);
        Upload(sl, slots_);
        kc::PrepArgs pa = PrepFor(0, B, 1);
        CK(kc::LaunchTokenPrep(pa, stream_));
        if (pass == 0) {
          kc::RecurrentArgs ra;
          ra.g = g_;
          ra.slots = slots_;
          ra.batch = B;
          ra.pools = pools_;
          ra.prep = prep_;
          ra.out = out_;
          ra.out_dtype = kc::kBF16;
          CK(kc::LaunchRecurrentDecode(ra, stream_));
        } else {
          kc::StepArgs sa;
          sa.g = g_;
          sa.items = descs_;
          sa.num_items = B;
          sa.page_table = page_table_;
          sa.pools = pools_;
          sa.prep = prep_;
          sa.out = out_;
          sa.out_dtype = kc::kBF16;
          sa.counters = counters_;
          sa.max_tokens = 1;
          sa.max_rows = t == C ? 0 : t;
          sa.any_fold = t == C;
          sa.variant = step_variant;
          sa.stream_begin = 0;
          sa.stream_fold_end = t == C ? B : 0;
          sa.stream_max_tokens = 1;
          sa.stream_max_rows = t;
          CK(kc::LaunchBufferedStep(sa, stream_));
        }
        CK(cudaStreamSynchronize(stream_));
        CK(cudaMemcpy((pass == 0 ? o1 : o2).data(), out_, outn * 2, cudaMemcpyDeviceToHost));
      }
      double num = 0, den = 0;
      for (size_t i = 0; i < outn; ++i) {
        const double x = Bf16ToFloat(o1[i]), y = Bf16ToFloat(o2[i]);
        num += (x - y) * (x - y);
        den += x * x;
      }
      worst = std::max(worst, std::sqrt(num / std::max(den, 1e-30)));
    }
    return worst;
  }

  // Tensor-core chunked prefill of B sequences of T tokens; optionally checked against the
  // recurrent kernel run token by token on copies of the same states and conv windows.
  PrefillResult Prefill(int B, int T, bool check) {
    PrefillResult r;
    r.B = B;
    r.T = T;
    const size_t N = static_cast<size_t>(B) * T;
    const size_t HK = static_cast<size_t>(g_.H) * g_.K, HVV = static_cast<size_t>(g_.HV) * g_.V;
    const int units_per = (T + kc::kChunk - 1) / kc::kChunk;
    uint16_t *qkv, *a, *b, *out, *bf;
    float* gb;
    CK(cudaMalloc(&qkv, N * g_.channels * 2));
    CK(cudaMalloc(&a, N * g_.HV * 2));
    CK(cudaMalloc(&b, N * g_.HV * 2));
    CK(cudaMalloc(&out, N * HVV * 2));
    CK(cudaMalloc(&bf, N * (2 * HK + HVV) * 2));
    CK(cudaMalloc(&gb, N * g_.HV * 2 * 4));
    CK(LaunchFillUniformTyped(qkv, kc::kBF16, N * g_.channels, 31, -2.f, 2.f, stream_));
    CK(LaunchFillUniformTyped(a, kc::kBF16, N * g_.HV, 32, -2.f, 2.f, stream_));
    CK(LaunchFillUniformTyped(b, kc::kBF16, N * g_.HV, 33, -2.f, 2.f, stream_));
    const size_t nunits = static_cast<size_t>(B) * units_per;
    uint16_t* scratch;
    CK(cudaMalloc(&scratch, nunits * g_.HV * kc::kChunk * (g_.K + g_.V + kc::kChunk) * 2));
    const int base = kSlots - 2 * B;  // prefill slots; the reference copies follow
    std::vector<kc::StepDesc> d(B);
    std::vector<kc::PrepUnit> pu;
    std::vector<kc::ChunkUnit> cu;
    std::vector<kc::ChunkItem> ci(B);
    std::vector<int32_t> ids(B);
    for (int i = 0; i < B; ++i) {
      d[i].token_offset = i * T;
      d[i].num_tokens = T;
      d[i].state_slot = base + i;
      d[i].page_offset = (base + i) * kPagesPerSeq;
      d[i].conv_slot = base + i;
      d[i].fold_tokens = T;
      ids[i] = i;
      ci[i].item = i;
      ci[i].unit_begin = static_cast<int32_t>(cu.size());
      for (int t = 0; t < T; t += kc::kChunk) {
        const int len = std::min(kc::kChunk, T - t);
        cu.push_back({i, t, len, 0});
        pu.push_back({i, t, t + len, kc::kChunkMode});
      }
      ci[i].unit_fold_end = ci[i].unit_end = static_cast<int32_t>(cu.size());
    }
    auto* dd = Upload(d);
    auto* dpu = Upload(pu);
    auto* dcu = Upload(cu);
    auto* dci = Upload(ci);
    auto* dids = Upload(ids);
    kc::Prepared p;
    p.qh = bf;
    p.kh = bf + N * HK;
    p.vh = bf + 2 * N * HK;
    p.G = gb;
    p.beta = gb + N * g_.HV;
    kc::PrepArgs pa;
    pa.g = g_;
    pa.items = dd;
    pa.units = dpu;
    pa.num_units = static_cast<int32_t>(pu.size());
    pa.page_table = page_table_;
    pa.pools = pools_;
    pa.w = weights_;
    pa.qkv = qkv;
    pa.a = a;
    pa.b = b;
    pa.in_dtype = kc::kBF16;
    pa.out = p;
    pa.chunk_only = true;
    kc::WindowAdvanceArgs wa;
    wa.g = g_;
    wa.items = dd;
    wa.item_ids = dids;
    wa.num = B;
    wa.pools = pools_;
    wa.qkv = qkv;
    wa.in_dtype = kc::kBF16;
    kc::ChunkArgs ca;
    ca.g = g_;
    ca.items = dd;
    ca.units = dcu;
    ca.num_units = static_cast<int32_t>(cu.size());
    ca.chunk_items = dci;
    ca.num_chunk_items = B;
    ca.page_table = page_table_;
    ca.pools = pools_;
    ca.prep = p;
    ca.scratch.W = scratch;
    ca.scratch.U = scratch + nunits * g_.HV * kc::kChunk * g_.K;
    ca.scratch.P = ca.scratch.U + nunits * g_.HV * kc::kChunk * g_.V;
    ca.out = out;
    ca.out_dtype = kc::kBF16;
    const size_t conv_slot = static_cast<size_t>(g_.W - 1 + kMaxDrafts) * g_.channels * 4;
    auto copy_slots = [&](int from, int to) {
      CK(cudaMemcpyAsync(pools_.states + static_cast<size_t>(to) * state_bytes_ / 4,
                         pools_.states + static_cast<size_t>(from) * state_bytes_ / 4,
                         B * state_bytes_, cudaMemcpyDeviceToDevice, stream_));
      CK(cudaMemcpyAsync(static_cast<uint8_t*>(pools_.conv) + to * conv_slot,
                         static_cast<uint8_t*>(pools_.conv) + from * conv_slot, B * conv_slot,
                         cudaMemcpyDeviceToDevice, stream_));
    };
    if (check) copy_slots(base, base + B);  // the reference starts from the same state
    Events ev, e1, e2;
    std::vector<double> t, tp, tl, ts;
    const int iters = check ? 1 : 6;
    for (int it = 0; it < iters + (check ? 0 : 1); ++it) {
      CK(cudaMemsetAsync(out, 0xff, N * HVV * 2, stream_));
      CK(LaunchDelay(20, stream_));
      CK(cudaEventRecord(ev.a, stream_));
      CK(kc::LaunchTokenPrep(pa, stream_));
      CK(kc::LaunchConvWindowAdvance(wa, stream_));
      CK(cudaEventRecord(e1.a, stream_));
      CK(kc::LaunchChunkLocal(ca, stream_));
      CK(cudaEventRecord(e2.a, stream_));
      CK(kc::LaunchChunkState(ca, stream_));
      CK(cudaEventRecord(ev.b, stream_));
      CK(cudaEventSynchronize(ev.b));
      float ms, m1, m2, m3;
      CK(cudaEventElapsedTime(&ms, ev.a, ev.b));
      CK(cudaEventElapsedTime(&m1, ev.a, e1.a));
      CK(cudaEventElapsedTime(&m2, e1.a, e2.a));
      CK(cudaEventElapsedTime(&m3, e2.a, ev.b));
      if (check || it > 0) {
        t.push_back(ms);
        tp.push_back(m1);
        tl.push_back(m2);
        ts.push_back(m3);
      }
    }
    r.prep_ms = Median(tp);
    r.local_ms = Median(tl);
    r.state_ms = Median(ts);
    CK(cudaGetLastError());
    r.ms = Median(t);
    r.mtok_s = N / (r.ms * 1e-3) / 1e6;
    std::vector<uint16_t> h(N * HVV);
    CK(cudaMemcpy(h.data(), out, h.size() * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < h.size(); ++i) {
      if (!std::isfinite(Bf16ToFloat(h[i]))) {
        std::fprintf(stderr, "prefill output %zu not written or not finite\n", i);
        std::exit(2);
      }
    }
    ++outputs_checked_;
    if (check) {
      // Token by token with the recurrent kernel (fp32 state) from the copies.
      std::vector<uint16_t> ref(N * HVV);
      std::vector<kc::StepDesc> rd(B);
      std::vector<kc::PrepUnit> ru(B);
      std::vector<int32_t> rs(B);
      for (int tok = 0; tok < T; ++tok) {
        CK(cudaStreamSynchronize(stream_));  // the descriptors below are overwritten synchronously
        for (int i = 0; i < B; ++i) {
          rd[i] = kc::StepDesc();
          rd[i].token_offset = i * T + tok;
          rd[i].num_tokens = 1;
          rd[i].state_slot = base + B + i;
          rd[i].conv_slot = base + B + i;
          ru[i] = {i, 0, 1, kc::kInlineWindow};
          rs[i] = base + B + i;
        }
        Upload(rd, descs_);
        Upload(ru, units_);
        Upload(rs, slots_);
        kc::PrepArgs rp = PrepFor(0, B, 1);
        rp.qkv = qkv;
        rp.a = a;
        rp.b = b;
        CK(kc::LaunchTokenPrep(rp, stream_));
        // The recurrent kernel reads prepared token b at index b: prep wrote it at token_offset.
        kc::RecurrentArgs ra;
        ra.g = g_;
        ra.slots = slots_;
        ra.batch = 1;
        ra.pools = pools_;
        ra.out_dtype = kc::kBF16;
        for (int i = 0; i < B; ++i) {
          const size_t off = static_cast<size_t>(i) * T + tok;
          ra.slots = slots_ + i;
          ra.prep = prep_;
          ra.prep.q = prep_.q + off * HK;
          ra.prep.k = prep_.k + off * HK;
          ra.prep.v = prep_.v + off * HVV;
          ra.prep.G = prep_.G + off * g_.HV;
          ra.prep.beta = prep_.beta + off * g_.HV;
          ra.out = out + off * HVV;
          CK(kc::LaunchRecurrentDecode(ra, stream_));
        }
      }
      CK(cudaStreamSynchronize(stream_));
      CK(cudaMemcpy(ref.data(), out, ref.size() * 2, cudaMemcpyDeviceToHost));
      double num = 0, den = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        const double x = Bf16ToFloat(ref[i]), y = Bf16ToFloat(h[i]);
        num += (x - y) * (x - y);
        den += x * x;
      }
      r.rel_err = std::sqrt(num / std::max(den, 1e-30));
    }
    for (void* q : {static_cast<void*>(qkv), static_cast<void*>(a), static_cast<void*>(b),
                    static_cast<void*>(out), static_cast<void*>(bf), static_cast<void*>(gb),
                    static_cast<void*>(scratch), static_cast<void*>(dd), static_cast<void*>(dpu),
                    static_cast<void*>(dcu), static_cast<void*>(dci), static_cast<void*>(dids)}) {
      CK(cudaFree(q));
    }
    return r;
  }

  int outputs_checked() const { return outputs_checked_; }
  bool prep_scratch_fits(size_t tokens) const { return tokens <= kMaxTokens; }

 private:
  kc::PrepArgs PrepFor(int set, int B, int m) {
    kc::PrepArgs pa;
    pa.max_unit_tokens = m;
    pa.g = g_;
    pa.items = descs_ + static_cast<size_t>(set) * B;
    pa.units = units_ + static_cast<size_t>(set) * B;
    pa.num_units = B;
    pa.page_table = page_table_;
    pa.pools = pools_;
    pa.w = weights_;
    pa.qkv = qkv_;
    pa.a = a_;
    pa.b = b_;
    pa.in_dtype = kc::kBF16;
    pa.out = prep_;
    return pa;
  }

  kc::Geometry g_;
  kc::Pools pools_;
  kc::LayerWeights weights_;
  kc::Prepared prep_;
  cudaStream_t stream_ = nullptr;
  size_t state_bytes_ = 0, out_bytes_ = 0;
  int32_t* page_table_ = nullptr;
  void *qkv_ = nullptr, *a_ = nullptr, *b_ = nullptr, *out_ = nullptr;
  int32_t* counters_ = nullptr;
  kc::StepDesc* descs_ = nullptr;
  kc::PrepUnit* units_ = nullptr;
  int32_t* slots_ = nullptr;
  float* sink_ = nullptr;
  int outputs_checked_ = 0;
};

const char* DtypeName(int32_t d) { return d == kc::kF32 ? "fp32" : "bf16"; }

int Main(int argc, char** argv) {
  std::string out_path = "bench-result.json", commit = "unknown";
  bool quick = false, profile = false, fast = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    if (a == "--commit" && i + 1 < argc) commit = argv[++i];
    if (a == "--quick") quick = true;
    // fp32 C=16 only (default v7 streaming kernels, v5 head kernel, 64-column streaming tiles),
    // prefill 4 x 8192.
    if (a == "--fast") fast = true;
    if (a == "--profile") profile = true;  // a few launches of each kernel, for ncu
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::gmtime(&now));
  std::printf("card: %s, %d SMs, L2 %d MiB, %.1f GiB; date %s; commit %s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20,
              prop.totalGlobalMem / double(1 << 30), date, commit.c_str());
  Bench bench;
  if (profile) {
    bench.SetBufferDtype(kc::kF32);
    for (int B : {1, 2, 4, 8, 16, 32}) {
      std::printf(
          "B=%d n=8: head %.1f us, register %.1f us, tile %.1f us; recurrent %.1f / %.1f us\n", B,
          bench.TimeVariant(1, B, 1, 8, 0, true, 0), bench.TimeVariant(1, B, 1, 8, 0, true, 1),
          bench.TimeVariant(1, B, 1, 8, 0, true, 2), bench.TimeVariant(0, B, 1, 0, 0, true, 0),
          bench.TimeVariant(0, B, 1, 0, 0, true, 1));
    }
    for (int n : {0, 1, 8, 15}) {
      std::printf("B=512 n=%d: with state %.1f us, stateless %.1f us\n", n,
                  bench.TimeVariant(1, 512, 1, n, 0, true),
                  bench.TimeVariant(3, 512, 1, n, 0, true));
    }
    std::printf("B=512 flush only (m=0, n=16): %.1f us; fold + token: %.1f us\n",
                bench.TimeVariant(1, 512, 0, 16, kc::kFoldFirst, false),
                bench.TimeVariant(1, 512, 1, 16, kc::kFoldFirst, true));
    bench.SetBufferDtype(kc::kF32);
    std::printf("recurrent %.1f us\n", bench.TimeVariant(0, 512, 1, 0, 0, true, 0));
    std::printf("buffered n=8 %.1f us\n", bench.TimeVariant(1, 512, 1, 8, 0, true));
    std::printf("fold step %.1f us\n", bench.TimeVariant(1, 512, 1, 16, kc::kFoldFirst, true));
    PrefillResult r = bench.Prefill(4, 8192, false);
    std::printf("prefill %.3f ms\n", r.ms);
    return 0;
  }
  double copy_tbps = 0, read_tbps = 0;
  bench.MeasureBandwidth(&copy_tbps, &read_tbps);
  std::printf("copy bandwidth %.3f TB/s (read + write), read bandwidth %.3f TB/s\n", copy_tbps,
              read_tbps);
  const double S = static_cast<double>(bench.state_bytes());
  const std::vector<int> batches =
      quick ? std::vector<int>{1, 64, 256} : std::vector<int>{1, 8, 64, 256, 512};

  const double consistency = bench.Consistency(8, 16);
  std::printf("consistency: buffered vs recurrent outputs over 16 steps + fold, rel err %.3g\n",
              consistency);

  std::vector<ConfigResult> configs;
  std::vector<DecodeResult> rec;  // recurrent + prep per batch (from the first config)
  const std::vector<std::pair<int32_t, int>> sweep =
      quick ? std::vector<std::pair<int32_t, int>>{{kc::kBF16, 16}, {kc::kF32, 16}}
      : fast
          ? std::vector<std::pair<int32_t, int>>{{kc::kF32, 16}}
          : std::vector<std::pair<int32_t, int>>{{kc::kF32, 8},  {kc::kF32, 16},  {kc::kF32, 32},
                                                 {kc::kBF16, 8}, {kc::kBF16, 16}, {kc::kBF16, 32}};
  for (auto [dtype, C] : sweep) {
    bench.SetBufferDtype(dtype);
    ConfigResult cr;
    cr.dtype = dtype;
    cr.C = C;
    for (size_t i = 0; i < batches.size(); ++i) {
      const bool first = rec.size() <= i;
      DecodeResult r = bench.Decode(batches[i], C, first);
      if (first) {
        rec.push_back(r);
      } else {
        r.recurrent_us = rec[i].recurrent_us;
        r.recurrent_tile_us = rec[i].recurrent_tile_us;
        r.recurrent_reg_us = rec[i].recurrent_reg_us;
        r.prep_us = rec[i].prep_us;
      }
      if (first) {
        std::printf("B=%3d recurrent: smem-tile kernel %.1f us, register-tile kernel %.1f us\n",
                    r.B, r.recurrent_tile_us, r.recurrent_reg_us);
      }
      std::printf(
          "%s C=%2d B=%3d: recurrent %8.1f us (%.2f TB/s), buffered %8.1f us (%.3fx), "
          "fold step %8.1f, flush %8.1f, verify4 %8.1f, prep %6.1f\n",
          DtypeName(dtype), C, r.B, r.recurrent_us, 2 * S * r.B / r.recurrent_us / 1e6,
          r.buffered_us, r.buffered_us / r.recurrent_us, r.fold_step_us, r.flush_us, r.verify4_us,
          r.prep_us);
      std::fflush(stdout);
      cr.rows.push_back(r);
    }
    configs.push_back(cr);
  }
  // The v5 head kernel (variant 5) and single streaming tile shapes (variants 7, 11, 13) in the
  // same run, fp32 rows, C = 16.
  bench.SetBufferDtype(kc::kF32);
  std::vector<std::pair<int, ConfigResult>> others;
  for (int variant : {5, 8, 12}) {
    ConfigResult other;
    other.dtype = kc::kF32;
    other.C = 16;
    bench.step_variant = variant;
    std::printf("consistency (variant %d): rel err %.3g\n", variant, bench.Consistency(8, 16));
    for (size_t i = 0; i < batches.size(); ++i) {
      DecodeResult r = bench.Decode(batches[i], 16, false);
      r.recurrent_us = rec[i].recurrent_us;
      r.recurrent_tile_us = rec[i].recurrent_tile_us;
      r.recurrent_reg_us = rec[i].recurrent_reg_us;
      r.prep_us = rec[i].prep_us;
      std::printf(
          "variant %d fp32 C=16 B=%3d: buffered %8.1f us (%.3fx), fold step %8.1f, "
          "flush %8.1f, verify4 %8.1f\n",
          variant, r.B, r.buffered_us, r.buffered_us / r.recurrent_us, r.fold_step_us, r.flush_us,
          r.verify4_us);
      std::fflush(stdout);
      other.rows.push_back(r);
    }
    others.emplace_back(variant, other);
  }
  bench.step_variant = 0;
  // Best configuration: lowest geometric mean of buffered/recurrent over B >= 64.
  size_t best = 0;
  double best_score = 1e30;
  for (size_t c = 0; c < configs.size(); ++c) {
    double lg = 0;
    int cnt = 0;
    for (const DecodeResult& r : configs[c].rows) {
      if (r.B >= 64) {
        lg += std::log(r.buffered_us / r.recurrent_us);
        ++cnt;
      }
    }
    const double score = cnt ? lg / cnt : 0;
    if (score < best_score) {
      best_score = score;
      best = c;
    }
  }

  std::vector<PrefillResult> prefill;
  const std::vector<std::pair<int, int>> pre =
      quick || fast ? std::vector<std::pair<int, int>>{{4, 8192}}
                    : std::vector<std::pair<int, int>>{{1, 8192}, {4, 8192}, {16, 2048}};
  PrefillResult chk = bench.Prefill(1, 2048, true);
  std::printf("tensor-core prefill vs recurrent fp32 (1 x 2048 tokens): rel err %.3g\n",
              chk.rel_err);
  for (auto [B, T] : pre) {
    PrefillResult r = bench.Prefill(B, T, false);
    std::printf(
        "prefill B=%d T=%d: %.3f ms, %.2f M tok/s (prep+conv %.3f ms, chunk-local %.3f ms, "
        "chunk-state %.3f ms)\n",
        B, T, r.ms, r.mtok_s, r.prep_ms, r.local_ms, r.state_ms);
    prefill.push_back(r);
  }

  // Table of the best configuration.
  const ConfigResult& bc = configs[best];
  std::printf("\nbest configuration: %s rows, C=%d\n", DtypeName(bc.dtype), bc.C);
  std::printf(
      "| B | recurrent_us | buffered_us | ratio | flush_us | verify4_us | read_floor_us |"
      " buffered/floor | flush/copy-floor | verify4/buffered |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const DecodeResult& r : bc.rows) {
    const double floor_us = r.B * S / (read_tbps * 1e12) * 1e6;
    const double copy_floor = 2 * r.B * S / (copy_tbps * 1e12) * 1e6;
    std::printf("| %d | %.1f | %.1f | %.3f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f |\n", r.B,
                r.recurrent_us, r.buffered_us, r.buffered_us / r.recurrent_us, r.flush_us,
                r.verify4_us, floor_us, r.buffered_us / floor_us, r.flush_us / copy_floor,
                r.verify4_us / r.buffered_us);
  }

  // configs[i] with fp32 rows and C = 16 is the default kernel's row set.
  const ConfigResult* v7 = &configs[0];
  for (const ConfigResult& c : configs) {
    if (c.dtype == kc::kF32 && c.C == 16) v7 = &c;
  }
  for (const auto& [variant, other] : others) {
    std::printf(
        "\nsame run, fp32 rows, C=16: default (v7 streaming, shape by case) vs variant %d\n",
        variant);
    std::printf(
        "| B | buffered v7 | buffered v%d | fold step v7 | fold step v%d | flush v7 | "
        "flush v%d | verify4 v7 | verify4 v%d |\n|---|---|---|---|---|---|---|---|---|\n",
        variant, variant, variant, variant);
    for (size_t i = 0; i < other.rows.size() && i < v7->rows.size(); ++i) {
      const DecodeResult &n = v7->rows[i], &o = other.rows[i];
      std::printf("| %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", n.B,
                  n.buffered_us, o.buffered_us, n.fold_step_us, o.fold_step_us, n.flush_us,
                  o.flush_us, n.verify4_us, o.verify4_us);
    }
  }

  FILE* f = std::fopen(out_path.c_str(), "w");
  if (f == nullptr) {
    std::perror(out_path.c_str());
    return 1;
  }
  std::fprintf(f, "{\n  \"card\": \"%s\",\n  \"date\": \"%s\",\n  \"commit\": \"%s\",\n", prop.name,
               date, commit.c_str());
  std::fprintf(f, "  \"shapes\": {\"H\": 16, \"HV\": 32, \"K\": 128, \"V\": 128, \"W\": 4},\n");
  std::fprintf(f, "  \"state_bytes_per_seq_layer\": %.0f,\n", S);
  std::fprintf(f, "  \"copy_TBps\": %.4f,\n  \"read_TBps\": %.4f,\n", copy_tbps, read_tbps);
  std::fprintf(f, "  \"consistency_rel_err\": %.3g,\n", consistency);
  std::fprintf(f, "  \"prefill_tc_vs_recurrent_rel_err\": %.3g,\n", chk.rel_err);
  std::fprintf(f, "  \"outputs_checked\": %d,\n", bench.outputs_checked());
  std::fprintf(f, "  \"best\": {\"buffer_dtype\": \"%s\", \"C\": %d},\n", DtypeName(bc.dtype),
               bc.C);
  auto row_json = [&](const DecodeResult& r, const char* indent) {
    const double floor_us = r.B * S / (read_tbps * 1e12) * 1e6;
    std::fprintf(f,
                 "%s{\"B\": %d, \"recurrent_us\": %.2f, \"buffered_us\": %.2f, \"flush_us\": %.2f, "
                 "\"verify4_us\": %.2f, \"read_floor_us\": %.2f, \"copy_TBps\": %.4f, "
                 "\"read_TBps\": %.4f, \"prep_us\": %.2f, \"fold_step_us\": %.2f, "
                 "\"recurrent_smem_tile_us\": %.2f, \"recurrent_reg_tile_us\": %.2f, "
                 "\"verify_us_m1_2_4_8\": [%.2f, %.2f, %.2f, %.2f]}",
                 indent, r.B, r.recurrent_us, r.buffered_us, r.flush_us, r.verify4_us, floor_us,
                 copy_tbps, read_tbps, r.prep_us, r.fold_step_us, r.recurrent_tile_us,
                 r.recurrent_reg_us, r.verify_us[0], r.verify_us[1], r.verify_us[2],
                 r.verify_us[3]);
  };
  std::fprintf(f, "  \"rows\": [\n");
  for (size_t i = 0; i < bc.rows.size(); ++i) {
    row_json(bc.rows[i], "    ");
    std::fprintf(f, "%s\n", i + 1 < bc.rows.size() ? "," : "");
  }
  for (const auto& [variant, other] : others) {
    std::fprintf(f, "  ],\n  \"variant%d_fp32_C16_rows\": [\n", variant);
    for (size_t i = 0; i < other.rows.size(); ++i) {
      row_json(other.rows[i], "    ");
      std::fprintf(f, "%s\n", i + 1 < other.rows.size() ? "," : "");
    }
  }
  std::fprintf(f, "  ],\n  \"sweep\": [\n");
  for (size_t c = 0; c < configs.size(); ++c) {
    std::fprintf(f, "    {\"buffer_dtype\": \"%s\", \"C\": %d, \"rows\": [\n",
                 DtypeName(configs[c].dtype), configs[c].C);
    for (size_t i = 0; i < configs[c].rows.size(); ++i) {
      row_json(configs[c].rows[i], "      ");
      std::fprintf(f, "%s\n", i + 1 < configs[c].rows.size() ? "," : "");
    }
    std::fprintf(f, "    ]}%s\n", c + 1 < configs.size() ? "," : "");
  }
  std::fprintf(f, "  ],\n  \"prefill\": [\n");
  for (size_t i = 0; i < prefill.size(); ++i) {
    std::fprintf(f,
                 "    {\"B\": %d, \"T\": %d, \"ms\": %.4f, \"Mtok_s\": %.3f, \"prep_ms\": %.4f, "
                 "\"chunk_local_ms\": %.4f, \"chunk_state_ms\": %.4f}%s\n",
                 prefill[i].B, prefill[i].T, prefill[i].ms, prefill[i].mtok_s, prefill[i].prep_ms,
                 prefill[i].local_ms, prefill[i].state_ms, i + 1 < prefill.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
  std::printf("wrote %s (%d output sets checked)\n", out_path.c_str(), bench.outputs_checked());
  return 0;
}

}  // namespace
}  // namespace kvbuffer::bench

int main(int argc, char** argv) { return kvbuffer::bench::Main(argc, argv); }
