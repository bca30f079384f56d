// RunLayerStepOnDevice against RunLayerStep: two CUDA backends fed the same steps (prefill of
// every exact path, decode, verify, a fused flush), one through host activations, one through
// device activations ordered on a caller stream; outputs and states must agree.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"
#include "service/engine/cuda/cuda_backend.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvbuffer::testing {
namespace {

#define KVB_CK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// Pools of the small model for the tests here: `slots` states and conv windows, pages of 4 rows.
PoolSizes SmallPools(int32_t slots, int32_t pages) {
  PoolSizes sz;
  sz.state_slots = slots;
  sz.buffer_pages = pages;
  sz.page_tokens = 4;
  sz.conv_slots = slots;
  sz.max_drafts = 4;
  return sz;
}

// A host step over fp32 activations and outputs.
LayerStep HostStep(StepKind kind, std::span<const StepItem> items, std::span<const int32_t> pages,
                   const float* qkv, const float* a, const float* b, int32_t tokens, float* out) {
  LayerStep st;
  st.kind = kind;
  st.items = items;
  st.page_table = pages;
  st.qkv = qkv;
  st.a = a;
  st.b = b;
  st.total_tokens = tokens;
  st.out = out;
  return st;
}

TEST(CudaDeviceStep, NonCudaBackendIsUnimplemented) {
  auto cpu = MakeCpuBackend();
  LayerStep st;
  EXPECT_EQ(RunLayerStepOnDevice(*cpu, st, nullptr).code(), absl::StatusCode::kUnimplemented);
}

TEST(CudaDeviceStep, MatchesHostStep) {
  KVB_REQUIRE_GPU();
  ModelConfig m;
  ASSERT_TRUE(ModelPreset("small", &m));
  const PoolSizes sz = SmallPools(4, 16);
  auto host = MakeCudaBackend(0);
  auto dev = MakeCudaBackend(0);
  const std::vector<LayerParams> params = MakeAllLayerParams(m);
  ASSERT_TRUE(host->Allocate(m, params, sz).ok());
  ASSERT_TRUE(dev->Allocate(m, params, sz).ok());
  for (Backend* b : {host.get(), dev.get()}) {
    ASSERT_TRUE(b->ResetConv(std::vector<int32_t>{0, 1, 2, 3}).ok());
  }
  cudaStream_t user = nullptr;
  KVB_CK(cudaStreamCreateWithFlags(&user, cudaStreamNonBlocking));
  const size_t max_t = 80;
  void *d_qkv = nullptr, *d_a = nullptr, *d_b = nullptr, *d_out = nullptr;
  KVB_CK(cudaMalloc(&d_qkv, max_t * m.channels() * sizeof(float)));
  KVB_CK(cudaMalloc(&d_a, max_t * m.num_v_heads * sizeof(float)));
  KVB_CK(cudaMalloc(&d_b, max_t * m.num_v_heads * sizeof(float)));
  KVB_CK(cudaMalloc(&d_out, max_t * m.out_elems() * sizeof(float)));
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd;
  const std::vector<int32_t> pages = {0, 1, 2, 3, 4, 5, 6, 7};
  // StepItem: token_offset, num_tokens, state_slot, state_is_new, fold_first, buffer_rows,
  // chunked, fold_tokens, conv_slot, page_offset, num_pages.
  struct Call {
    StepKind kind;
    std::vector<StepItem> items;
  };
  const std::vector<Call> calls = {
      {StepKind::kPrefill,
       {{0, 3, 0, true, false, 0, false, 0, 0, 0, 2},
        {3, 1, -1, false, false, 0, false, 0, 1, 2, 2},
        {4, 70, 1, true, true, 0, true, 64, 2, 4, 2}}},
      {StepKind::kDecode,
       {{0, 1, 0, false, false, 3, false, 0, 0, 0, 2},
        {1, 1, 1, false, false, 6, false, 0, 2, 4, 2}}},
      {StepKind::kVerify, {{0, 4, 0, false, false, 4, false, 0, 0, 0, 2}}},
      {StepKind::kDecode,
       {{0, 1, 0, false, true, 4, false, 0, 0, 0, 2},
        {1, 1, 1, false, true, 7, false, 0, 2, 4, 2}}},
  };
  double worst = 0;
  for (size_t c = 0; c < calls.size(); ++c) {
    int32_t T = 0;
    for (const StepItem& it : calls[c].items) T = std::max(T, it.token_offset + it.num_tokens);
    std::vector<float> qkv(static_cast<size_t>(T) * m.channels()), a(T * m.num_v_heads),
        b(T * m.num_v_heads);
    for (auto* v : {&qkv, &a, &b}) {
      for (float& x : *v) x = nd(rng);
    }
    const size_t out_n = static_cast<size_t>(T) * m.out_elems();
    std::vector<float> out_h(out_n, std::numeric_limits<float>::quiet_NaN()), out_d = out_h;
    LayerStep st = HostStep(calls[c].kind, calls[c].items, pages, qkv.data(), a.data(), b.data(), T,
                            out_h.data());
    st.layer = static_cast<int32_t>(c % m.num_layers);
    ASSERT_TRUE(host->RunLayerStep(st).ok());
    // Device path: uploads, poison, step and download all queued on `user`, one sync at the end.
    KVB_CK(cudaMemcpyAsync(d_qkv, qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice, user));
    KVB_CK(cudaMemcpyAsync(d_a, a.data(), a.size() * 4, cudaMemcpyHostToDevice, user));
    KVB_CK(cudaMemcpyAsync(d_b, b.data(), b.size() * 4, cudaMemcpyHostToDevice, user));
    KVB_CK(cudaMemsetAsync(d_out, 0xff, out_n * 4, user));
    LayerStep sd = st;
    sd.qkv = d_qkv;
    sd.a = d_a;
    sd.b = d_b;
    sd.out = d_out;
    const absl::Status s = RunLayerStepOnDevice(*dev, sd, user);
    ASSERT_TRUE(s.ok()) << s;
    KVB_CK(cudaMemcpyAsync(out_d.data(), d_out, out_n * 4, cudaMemcpyDeviceToHost, user));
    KVB_CK(cudaStreamSynchronize(user));
    for (size_t i = 0; i < out_n; ++i) {
      ASSERT_TRUE(std::isfinite(out_d[i])) << "call " << c << " output " << i << " not written";
      const double d = std::fabs(out_d[i] - out_h[i]) / (1.0 + std::fabs(out_h[i]));
      worst = std::max(worst, d);
    }
    for (int32_t slot : {0, 1}) {
      std::vector<float> sh(m.state_elems()), sdv(m.state_elems());
      ASSERT_TRUE(host->ReadState(slot, st.layer, sh.data()).ok());
      ASSERT_TRUE(dev->ReadState(slot, st.layer, sdv.data()).ok());
      for (size_t i = 0; i < sh.size(); ++i) {
        worst = std::max(worst, std::fabs(sh[i] - sdv[i]) / (1.0 + std::fabs(sh[i])));
      }
    }
  }
  std::printf("[device step] max difference to the host step %.3g\n", worst);
  EXPECT_LE(worst, 1e-6);
  for (void* p : {d_qkv, d_a, d_b, d_out}) KVB_CK(cudaFree(p));
  KVB_CK(cudaStreamDestroy(user));
}

// Host steps download outputs LayerStep::out_row_stride bytes apart (how a tensor-parallel rank
// lands its heads inside the full output): into page-locked memory directly, into plain memory
// through the bounce buffer; the bytes between rows stay untouched.
TEST(CudaHostStep, OutputRowStrideMatchesDenseOutputs) {
  KVB_REQUIRE_GPU();
  ModelConfig m;
  ASSERT_TRUE(ModelPreset("small", &m));
  const PoolSizes sz = SmallPools(2, 8);
  const std::vector<LayerParams> params = MakeAllLayerParams(m);
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd;
  constexpr int32_t T = 5;
  std::vector<float> qkv(static_cast<size_t>(T) * m.channels()), a(T * m.num_v_heads),
      b(T * m.num_v_heads);
  for (auto* v : {&qkv, &a, &b}) {
    for (float& x : *v) x = nd(rng);
  }
  const std::vector<int32_t> pages = {0, 1};
  const std::vector<StepItem> items = {{0, T, 0, true, false, 0, false, 0, 0, 0, 2}};
  const size_t row = static_cast<size_t>(m.out_elems());  // floats
  std::vector<float> dense(T * row);
  float* pinned = nullptr;
  KVB_CK(cudaHostAlloc(reinterpret_cast<void**>(&pinned), 3 * T * row * 4, cudaHostAllocDefault));
  std::vector<float> plain(3 * T * row);
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE(variant);  // 0: dense, 1: strided into page-locked, 2: strided into plain memory
    auto backend = MakeCudaBackend(0);
    ASSERT_TRUE(backend->TakesOutputRowStride());
    ASSERT_TRUE(backend->Allocate(m, params, sz).ok());
    ASSERT_TRUE(backend->ResetConv(std::vector<int32_t>{0, 1}).ok());
    float* out = variant == 0 ? dense.data() : variant == 1 ? pinned : plain.data();
    if (variant > 0) std::fill(out, out + 3 * T * row, -7.0f);
    // Rows at 3 * row, starting one row in.
    LayerStep st = HostStep(StepKind::kPrefill, items, pages, qkv.data(), a.data(), b.data(), T,
                            variant == 0 ? out : out + row);
    st.out_row_stride = variant == 0 ? 0 : 3 * row * sizeof(float);
    const absl::Status s = backend->RunLayerStep(st);
    ASSERT_TRUE(s.ok()) << s;
    if (variant == 0) continue;
    for (int32_t t = 0; t < T; ++t) {
      EXPECT_EQ(std::memcmp(out + (3 * t + 1) * row, dense.data() + t * row, row * 4), 0) << t;
      EXPECT_EQ(out[3 * t * row], -7.0f);
      EXPECT_EQ(out[(3 * t + 2) * row + row - 1], -7.0f);
    }
    // A stride shorter than a row is refused, naming the field.
    st.out_row_stride = row * sizeof(float) - 4;
    EXPECT_EQ(backend->RunLayerStep(st).code(), absl::StatusCode::kInvalidArgument);
  }
  KVB_CK(cudaFreeHost(pinned));
}

// A device that does not finish a call within CudaBackendOptions::sync_timeout turns the call
// into UNAVAILABLE, and every later call too, instead of blocking (a tensor-parallel group breaks
// on it rather than hanging the server). A 1 ns timeout makes a long prefill "hang".
TEST(CudaHostStep, MissedSyncTimeoutIsUnavailableForGood) {
  KVB_REQUIRE_GPU();
  ModelConfig m;
  ASSERT_TRUE(ModelPreset("small", &m));
  const PoolSizes sz = SmallPools(2, 8);
  CudaBackendOptions o;
  o.sync_timeout = absl::Nanoseconds(1);
  auto backend = MakeCudaBackend(o);
  ASSERT_TRUE(backend->Allocate(m, MakeAllLayerParams(m), sz).ok());
  constexpr int32_t T = 16384 + 6;  // a chunked prefill of milliseconds; 6 rows stay buffered
  std::vector<float> qkv(static_cast<size_t>(T) * m.channels(), 0.25f), a(T * m.num_v_heads, 0.5f),
      b(T * m.num_v_heads, 0.5f), out(static_cast<size_t>(T) * m.out_elems());
  const std::vector<int32_t> pages = {0, 1};
  const std::vector<StepItem> items = {{0, T, 0, true, true, 0, true, 16384, 0, 0, 2}};
  const LayerStep st =
      HostStep(StepKind::kPrefill, items, pages, qkv.data(), a.data(), b.data(), T, out.data());
  absl::Status s = backend->RunLayerStep(st);
  ASSERT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("did not finish"), std::string::npos) << s;
  EXPECT_EQ(backend->ResetConv(std::vector<int32_t>{0}).code(), absl::StatusCode::kUnavailable);
  std::vector<float> state(m.state_elems());
  EXPECT_EQ(backend->ReadState(0, 0, state.data()).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(backend->RunLayerStep(st).code(), absl::StatusCode::kUnavailable);
  cudaDeviceSynchronize();  // let the "hung" work drain before the buffers go
}

}  // namespace
}  // namespace kvbuffer::testing
