// The recurrent decode kernel (the bench baseline) with token prep, against the fp64 oracle.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/recurrent_decode.h"
#include "kernels/cuda/token_prep.h"
#include "kernels/reference/gdn_oracle.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvbuffer::testing {
namespace {

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(expr)

template <typename T>
T* DeviceCopy(const std::vector<T>& v) {
  T* p = nullptr;
  if (cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)) != cudaSuccess) return nullptr;
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

void RunRecurrent(const char* preset, int batch, int steps) {
  ModelConfig m;
  ASSERT_TRUE(ModelPreset(preset, &m));
  const std::vector<LayerParams> params = MakeAllLayerParams(m);
  const int layer = m.num_layers - 1;
  cuda::Geometry g;
  g.H = m.num_k_heads;
  g.HV = m.num_v_heads;
  g.K = m.head_k_dim;
  g.V = m.head_v_dim;
  g.W = m.conv_width;
  g.L = m.num_layers;
  g.channels = m.channels();
  g.page_tokens = 1;
  g.max_drafts = 0;
  cuda::Pools pools;
  const size_t state_bytes = size_t(batch) * m.num_layers * m.state_elems() * 4;
  const size_t conv_bytes = size_t(batch) * m.num_layers * (m.conv_width - 1) * m.channels() * 4;
  CUDA_OK(cudaMalloc(&pools.states, state_bytes));
  CUDA_OK(cudaMalloc(&pools.conv, conv_bytes));
  CUDA_OK(cudaMemset(pools.states, 0, state_bytes));
  CUDA_OK(cudaMemset(pools.conv, 0, conv_bytes));
  float* w = DeviceCopy(params[layer].conv_weight);
  float* alog = DeviceCopy(params[layer].a_log);
  float* dtb = DeviceCopy(params[layer].dt_bias);
  std::vector<cuda::StepDesc> descs(batch);
  std::vector<cuda::PrepUnit> units(batch);
  std::vector<int32_t> slots(batch);
  for (int b = 0; b < batch; ++b) {
    descs[b].token_offset = b;
    descs[b].num_tokens = 1;
    descs[b].state_slot = b;
    descs[b].conv_slot = b;
    units[b] = {b, 0, 1, cuda::kInlineWindow};
    slots[b] = b;
  }
  auto* d_descs = DeviceCopy(descs);
  auto* d_units = DeviceCopy(units);
  auto* d_slots = DeviceCopy(slots);
  const size_t HK = size_t(g.H) * g.K, HVV = size_t(g.HV) * g.V;
  float* scratch = nullptr;
  CUDA_OK(cudaMalloc(&scratch, batch * (2 * HK + HVV + 2 * g.HV) * 4));
  cuda::Prepared prep;
  prep.q = scratch;
  prep.k = prep.q + batch * HK;
  prep.v = prep.k + batch * HK;
  prep.G = prep.v + batch * HVV;
  prep.beta = prep.G + batch * g.HV;
  float *d_qkv, *d_a, *d_b, *d_out;
  CUDA_OK(cudaMalloc(&d_qkv, batch * g.channels * 4));
  CUDA_OK(cudaMalloc(&d_a, batch * g.HV * 4));
  CUDA_OK(cudaMalloc(&d_b, batch * g.HV * 4));
  CUDA_OK(cudaMalloc(&d_out, batch * HVV * 4));
  std::vector<OracleSequence> oracles(batch, OracleSequence(m, &params));
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd;
  double worst = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<float> qkv(batch * g.channels), a(batch * g.HV), bb(batch * g.HV);
    for (auto* v : {&qkv, &a, &bb}) {
      for (float& x : *v) x = nd(rng);
    }
    CUDA_OK(cudaMemcpy(d_qkv, qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_a, a.data(), a.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(d_b, bb.data(), bb.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(d_out, 0xff, batch * HVV * 4));  // NaN poison
    cuda::PrepArgs pa;
    pa.g = g;
    pa.layer = layer;
    pa.items = d_descs;
    pa.units = d_units;
    pa.num_units = batch;
    pa.pools = pools;
    pa.w = {w, alog, dtb};
    pa.qkv = d_qkv;
    pa.a = d_a;
    pa.b = d_b;
    pa.in_dtype = cuda::kF32;
    pa.out = prep;
    CUDA_OK(cuda::LaunchTokenPrep(pa, nullptr));
    cuda::RecurrentArgs ra;
    ra.g = g;
    ra.layer = layer;
    ra.slots = d_slots;
    ra.batch = batch;
    ra.pools = pools;
    ra.prep = prep;
    ra.out = d_out;
    CUDA_OK(cuda::LaunchRecurrentDecode(ra, nullptr));
    std::vector<float> out(batch * HVV);
    CUDA_OK(cudaMemcpy(out.data(), d_out, out.size() * 4, cudaMemcpyDeviceToHost));
    for (int b = 0; b < batch; ++b) {
      std::vector<double> want =
          oracles[b].Append(layer, &qkv[b * g.channels], &a[b * g.HV], &bb[b * g.HV], 1);
      worst = std::max(worst, RelativeError(&out[b * HVV], want.data(), HVV));
    }
  }
  std::printf("[recurrent kernel %s B=%d, %d steps] error vs fp64 oracle %.3g\n", preset, batch,
              steps, worst);
  EXPECT_LE(worst, 1e-5);
  for (void* p : {static_cast<void*>(pools.states), pools.conv, static_cast<void*>(w),
                  static_cast<void*>(alog), static_cast<void*>(dtb), static_cast<void*>(d_descs),
                  static_cast<void*>(d_units), static_cast<void*>(d_slots),
                  static_cast<void*>(scratch), static_cast<void*>(d_qkv), static_cast<void*>(d_a),
                  static_cast<void*>(d_b), static_cast<void*>(d_out)}) {
    cudaFree(p);
  }
}

TEST(RecurrentKernel, TinyMatchesOracle) {
  KVB_REQUIRE_GPU();
  RunRecurrent("tiny", 3, 30);
}

TEST(RecurrentKernel, QwenShapesMatchOracle) {
  KVB_REQUIRE_GPU();
  RunRecurrent("qwen3-next-80b-a3b", 2, 12);
}

}  // namespace
}  // namespace kvbuffer::testing
