// CudaBackend against CpuBackend and the fp64 oracle: mixed ragged workloads (decode, verify with
// every accept count, prefill of every path, flush), wide heads (several column tiles per value
// head, so the fold_first race would show), bf16 buffer rows, tensor-core prefill, and poisoned
// outputs at the Backend level.
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "service/engine/engine.h"
#include "service/engine/engine_test_driver.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvbuffer::testing {
namespace {

using Seqs = std::vector<std::pair<uint64_t, int32_t>>;

EngineOptions Options(const ModelConfig& m, int32_t C, int32_t stateless, int32_t page_tokens,
                      DType buffer_dtype) {
  EngineOptions o;
  o.model = m;
  o.flush_interval = C;
  o.stateless_limit = stateless;
  o.max_drafts = std::min(C, 4);
  o.max_sequences = 32;
  o.state_slots = 32;
  o.buffer_pages = 4096;
  o.page_tokens = page_tokens;
  o.buffer_dtype = buffer_dtype;
  return o;
}

ModelConfig Wide() {
  ModelConfig m;
  m.name = "wide";
  m.num_layers = 2;
  m.num_k_heads = 2;
  m.num_v_heads = 4;
  m.head_k_dim = 128;
  m.head_v_dim = 128;
  m.conv_width = 4;
  return m;
}

ModelConfig Preset(const char* name) {
  ModelConfig m;
  EXPECT_TRUE(ModelPreset(name, &m));
  return m;
}

double RelDiff(const std::string& a, const std::string& b) {
  const float* x = reinterpret_cast<const float*>(a.data());
  const float* y = reinterpret_cast<const float*>(b.data());
  const size_t n = a.size() / 4;
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return std::numeric_limits<double>::infinity();
    num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    den += double(y[i]) * y[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Runs the same random mixed workload on `cuda` (checked against the oracle by `d`) and, when
// given, on `cpu`; returns {worst error vs oracle, worst difference vs cpu}.
std::pair<double, double> RunMixed(Engine* cuda, Engine* cpu, EngineDriver& d, int steps) {
  std::mt19937& rng = d.rng();
  const std::vector<uint64_t> ids = {1, 2, 3, 4, 5, 6};
  d.Open(ids);
  if (cpu != nullptr) {
    EXPECT_TRUE(cpu->Open("", ids).ok());
  }
  const int L = d.config().num_layers;
  const int max_drafts = cuda->options().max_drafts;
  double worst = 0, worst_cpu = 0;
  auto run = [&](StepKind kind, const Seqs& seqs) {
    for (int l = 0; l < L; ++l) {
      int32_t total = 0;
      for (auto [id, t] : seqs) total += t;
      Activations x = d.MakeActivations(total, DType::kFloat32);
      LayerCall call = d.MakeCall(l, seqs, x);
      auto exec = [&](Engine* e) {
        return kind == StepKind::kPrefill  ? e->Prefill(call)
               : kind == StepKind::kDecode ? e->DecodeStep(call)
                                           : e->VerifyDrafts(call);
      };
      absl::StatusOr<LayerResult> r = exec(cuda);
      ASSERT_TRUE(r.ok()) << r.status();
      if (cpu != nullptr) {
        absl::StatusOr<LayerResult> rc = exec(cpu);
        ASSERT_TRUE(rc.ok()) << rc.status();
        worst_cpu = std::max(worst_cpu, RelDiff(r->out.bytes, rc->out.bytes));
      }
      worst = std::max(worst, d.Check(kind, l, seqs, x, *r));
    }
  };
  for (int step = 0; step < steps; ++step) {
    const int what = std::uniform_int_distribution<int>(0, 9)(rng);
    Seqs seqs;
    for (uint64_t id : ids) {
      if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) continue;
      seqs.push_back({id, 1});
    }
    if (seqs.empty()) seqs.push_back({ids[0], 1});
    if (what < 5) {
      run(StepKind::kDecode, seqs);
    } else if (what < 8) {
      for (auto& s : seqs) s.second = std::uniform_int_distribution<int>(1, max_drafts)(rng);
      run(StepKind::kVerify, seqs);
      std::vector<CommitItem> items;
      Seqs accepted;
      for (auto [id, m] : seqs) {
        const int a = std::uniform_int_distribution<int>(0, m)(rng);
        accepted.push_back({id, a});
        items.push_back({id, d.Oracle(id).position(0), a});
      }
      if (cpu != nullptr) {
        EXPECT_TRUE(cpu->CommitDrafts("", items).ok());
      }
      EXPECT_TRUE(d.Commit(accepted).ok());
    } else if (what < 9) {
      for (auto& s : seqs) {
        s.second = std::uniform_int_distribution<int>(1, 3)(rng) == 1
                       ? std::uniform_int_distribution<int>(20, 90)(rng)
                       : std::uniform_int_distribution<int>(1, 9)(rng);
      }
      run(StepKind::kPrefill, seqs);
    } else {
      std::vector<uint64_t> f;
      for (auto [id, t] : seqs) f.push_back(id);
      EXPECT_TRUE(cuda->Flush("", f).ok());
      if (cpu != nullptr) {
        EXPECT_TRUE(cpu->Flush("", f).ok());
      }
    }
    if (::testing::Test::HasFatalFailure()) break;
  }
  return {worst, worst_cpu};
}

// Compares every state slot of both backends on every layer.
double StateDiff(Backend* a, Backend* b, const ModelConfig& m, int slots) {
  std::vector<float> x(m.state_elems()), y(m.state_elems());
  double worst = 0;
  for (int s = 0; s < slots; ++s) {
    for (int l = 0; l < m.num_layers; ++l) {
      EXPECT_TRUE(a->ReadState(s, l, x.data()).ok());
      EXPECT_TRUE(b->ReadState(s, l, y.data()).ok());
      std::string xs(reinterpret_cast<char*>(x.data()), x.size() * 4);
      std::string ys(reinterpret_cast<char*>(y.data()), y.size() * 4);
      worst = std::max(worst, RelDiff(xs, ys));
    }
  }
  return worst;
}

void CompareWithCpu(const EngineOptions& o, int steps, double tol_oracle, double tol_cpu) {
  auto cuda_b = MakeCudaBackend(0);
  auto cpu_b = MakeCpuBackend();
  Backend* cuda_raw = cuda_b.get();
  Backend* cpu_raw = cpu_b.get();
  auto cuda = Engine::Create(o, std::move(cuda_b));
  auto cpu = Engine::Create(o, std::move(cpu_b));
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EngineDriver d(cuda->get(), std::random_device{}());
  auto [worst, worst_cpu] = RunMixed(cuda->get(), cpu->get(), d, steps);
  const double states = StateDiff(cuda_raw, cpu_raw, o.model, o.state_slots);
  std::printf("[%s C=%d %s] error vs fp64 oracle %.3g, outputs vs CPU %.3g, states vs CPU %.3g\n",
              o.model.name.c_str(), o.flush_interval,
              std::string(DTypeName(o.buffer_dtype)).c_str(), worst, worst_cpu, states);
  EXPECT_LE(worst, tol_oracle);
  EXPECT_LE(worst_cpu, tol_cpu);
  EXPECT_LE(states, tol_cpu);
}

TEST(CudaBackend, TinyMatchesCpuAndOracle) {
  KVB_REQUIRE_GPU();
  CompareWithCpu(Options(Preset("tiny"), 4, 6, 2, DType::kFloat32), 60, 1e-5, 1e-5);
}

TEST(CudaBackend, WideHeadsMatchCpuAndOracle) {
  KVB_REQUIRE_GPU();
  CompareWithCpu(Options(Wide(), 8, 12, 4, DType::kFloat32), 40, 1e-5, 1e-5);
}

TEST(CudaBackend, SmallWithLongFlushIntervalMatchesCpu) {
  KVB_REQUIRE_GPU();
  CompareWithCpu(Options(Preset("small"), 32, 40, 16, DType::kFloat32), 40, 1e-5, 1e-5);
}

TEST(CudaBackend, Bf16BufferRowsErrorIsMeasured) {
  KVB_REQUIRE_GPU();
  // bf16 k^/u rows: ~3 significant digits per row; the oracle error is reported, the CPU backend
  // rounds the same values (small differences come from summation order before rounding).
  CompareWithCpu(Options(Wide(), 16, 16, 16, DType::kBFloat16), 40, 2e-2, 2e-2);
}

// Engine with tensor-core prefill, checked against the oracle only.
double TensorCoreRun(const ModelConfig& m, const std::vector<int32_t>& lengths, int decodes) {
  EngineOptions o = Options(m, 16, 16, 16, DType::kFloat32);
  o.max_sequences = static_cast<int32_t>(lengths.size());
  CudaBackendOptions co;
  co.prefill = CudaPrefillMode::kTensorCore;
  auto engine = Engine::Create(o, MakeCudaBackend(co));
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return 1e30;
  EngineDriver d(engine->get(), std::random_device{}());
  std::vector<uint64_t> ids;
  Seqs pre, ones;
  for (size_t i = 0; i < lengths.size(); ++i) {
    ids.push_back(i + 1);
    pre.push_back({i + 1, lengths[i]});
    ones.push_back({i + 1, 1});
  }
  d.Open(ids);
  double worst = d.Step(StepKind::kPrefill, pre);
  double dec = 0;
  for (int i = 0; i < decodes; ++i) dec = std::max(dec, d.Step(StepKind::kDecode, ones));
  std::printf("[tensor-core prefill %s, lengths", m.name.c_str());
  for (int32_t t : lengths) std::printf(" %d", t);
  std::printf("] prefill error vs oracle %.3g, following decodes %.3g\n", worst, dec);
  return std::max(worst, dec);
}

TEST(CudaBackend, TensorCorePrefillSmallShapes) {
  KVB_REQUIRE_GPU();
  EXPECT_LE(TensorCoreRun(Preset("small"), {1, 17, 63, 64, 65, 130, 300}, 20), 3e-2);
  EXPECT_LE(TensorCoreRun(Preset("tiny"), {5, 64, 100}, 10), 3e-2);
}

TEST(CudaBackend, TensorCorePrefillQwenShapes) {
  KVB_REQUIRE_GPU();
  ModelConfig m = Preset("qwen3-next-80b-a3b");
  m.num_layers = 1;
  EXPECT_LE(TensorCoreRun(m, {700, 129}, 4), 3e-2);
}

TEST(CudaBackend, ExactPrefillQwenShapes) {
  KVB_REQUIRE_GPU();
  ModelConfig m = Preset("qwen3-next-80b-a3b");
  m.num_layers = 1;
  EngineOptions o = Options(m, 16, 16, 16, DType::kFloat32);
  auto engine = Engine::Create(o, MakeCudaBackend(0));
  ASSERT_TRUE(engine.ok()) << engine.status();
  EngineDriver d(engine->get(), std::random_device{}());
  d.Open({1, 2});
  double worst = d.Step(StepKind::kPrefill, {{1, 300}, {2, 21}});
  for (int i = 0; i < 20; ++i) worst = std::max(worst, d.Step(StepKind::kDecode, {{1, 1}, {2, 1}}));
  worst = std::max(worst, d.Step(StepKind::kVerify, {{1, 4}, {2, 3}}));
  std::printf("[exact qwen shapes] error vs oracle %.3g\n", worst);
  EXPECT_LE(worst, 1e-5);
}

// Backend-level: outputs poisoned with NaN are all overwritten, for every path.
TEST(CudaBackend, PoisonedOutputsAreAllWritten) {
  KVB_REQUIRE_GPU();
  for (CudaPrefillMode mode : {CudaPrefillMode::kExact, CudaPrefillMode::kTensorCore}) {
    ModelConfig m = Preset("small");
    CudaBackendOptions co;
    co.prefill = mode;
    auto b = MakeCudaBackend(co);
    PoolSizes sz;
    sz.state_slots = 8;
    sz.buffer_pages = 64;
    sz.page_tokens = 4;
    sz.conv_slots = 8;
    sz.max_drafts = 4;
    ASSERT_TRUE(b->Allocate(m, MakeAllLayerParams(m), sz).ok());
    ASSERT_TRUE(b->ResetConv(std::vector<int32_t>{0, 1, 2, 3}).ok());
    std::mt19937 rng(std::random_device{}());
    std::normal_distribution<float> nd;
    // Items: stateless decode, stateful fold+decode (new state), chunked prefill, verify is a
    // separate call below.
    std::vector<StepItem> items(3);
    std::vector<int32_t> pages = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    items[0] = {0, 1, -1, false, false, 0, false, 0, 0, 0, 2};
    items[1] = {1, 3, 0, true, true, 0, false, 0, 1, 2, 2};
    items[2] = {4, 70, 1, true, true, 0, true, 64, 2, 4, 2};
    const int T = 74;
    std::vector<float> qkv(T * m.channels()), a(T * m.num_v_heads), bb(T * m.num_v_heads);
    for (auto* v : {&qkv, &a, &bb}) {
      for (float& x : *v) x = nd(rng);
    }
    std::vector<float> out(static_cast<size_t>(T) * m.out_elems(),
                           std::numeric_limits<float>::quiet_NaN());
    LayerStep st;
    st.layer = 1;
    st.kind = StepKind::kPrefill;
    st.items = items;
    st.page_table = pages;
    st.qkv = qkv.data();
    st.a = a.data();
    st.b = bb.data();
    st.total_tokens = T;
    st.out = out.data();
    ASSERT_TRUE(b->RunLayerStep(st).ok());
    for (size_t i = 0; i < out.size(); ++i) {
      ASSERT_TRUE(std::isfinite(out[i]))
          << "output " << i << " not written, mode " << static_cast<int>(mode);
    }
    std::vector<StepItem> vitems = {{0, 4, 0, false, false, 3, false, 0, 1, 2, 2}};
    std::vector<float> vout(4 * m.out_elems(), std::numeric_limits<float>::quiet_NaN());
    st.kind = StepKind::kVerify;
    st.items = vitems;
    st.total_tokens = 4;
    st.out = vout.data();
    ASSERT_TRUE(b->RunLayerStep(st).ok());
    for (float x : vout) ASSERT_TRUE(std::isfinite(x));
  }
}

}  // namespace
}  // namespace kvbuffer::testing
