// RunLayerStepOnDevice against RunLayerStep: two CUDA backends fed the same steps (prefill of
// every exact path, decode, verify, a fused flush), one through host activations, one through
// device activations ordered on a caller stream; outputs and states must agree.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"
#include "service/engine/cuda/cuda_backend.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvbuffer::testing {
namespace {

#define KVB_CK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

TEST(CudaDeviceStep, NonCudaBackendIsUnimplemented) {
  auto cpu = MakeCpuBackend();
  LayerStep st;
  EXPECT_EQ(RunLayerStepOnDevice(*cpu, st, nullptr).code(), absl::StatusCode::kUnimplemented);
}

TEST(CudaDeviceStep, MatchesHostStep) {
  KVB_REQUIRE_GPU();
  ModelConfig m;
  ASSERT_TRUE(ModelPreset("small", &m));
  PoolSizes sz;
  sz.state_slots = 4;
  sz.buffer_pages = 16;
  sz.page_tokens = 4;
  sz.conv_slots = 4;
  sz.max_drafts = 4;
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
    LayerStep st;
    st.layer = static_cast<int32_t>(c % m.num_layers);
    st.kind = calls[c].kind;
    st.items = calls[c].items;
    st.page_table = pages;
    st.qkv = qkv.data();
    st.a = a.data();
    st.b = b.data();
    st.total_tokens = T;
    st.out = out_h.data();
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

}  // namespace
}  // namespace kvbuffer::testing
