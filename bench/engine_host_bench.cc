// engine_host_bench: the host cost of one per-layer call through the engine, with no GPU.
//
// Drives Engine::DecodeStep (and VerifyDrafts + CommitDrafts, and a small Prefill) at Qwen3-Next
// shapes (H = 16, HV = 32, K = V = 128, channels 8192, L = 36 held, C = 16) and bf16 activations
// and outputs, like service/parallel/tp_bench.cc does on the GPUs, over a backend that does no
// math:
//   null    accepts every call and writes nothing: the engine's own host path (validation with
//           NaN/Inf checks, lookups, admission, page tables, the output tensor, replay records);
//   staged  what CudaBackend does on the host around its kernels (shared argument checks, the
//           activations copied into a staging buffer that is reused, the outputs copied out of
//           one), without CUDA: the host part of a TP = 1 GPU step;
//   cpu     the exact CpuBackend (real math; slow at these shapes: use a small --batch).
// Prints the median and mean per call in microseconds (CPU timings of the machine it runs on).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "service/engine/backend_validation.h"
#include "service/engine/engine.h"
#if __has_include("service/engine/activation_scan.h")
#include "service/engine/activation_scan.h"
#define KVB_HAVE_ACTIVATION_SCAN 1
#endif

ABSL_FLAG(std::string, batch, "64,256", "comma-separated batch sizes (B)");
ABSL_FLAG(std::string, backend, "null,staged", "comma-separated backends: null, staged, cpu");
ABSL_FLAG(int, layers, 36, "linear-attention layers held per sequence");
ABSL_FLAG(int, flush_interval, 16, "C");
ABSL_FLAG(int, cycles, 16, "timed flush cycles (decode steps = cycles * C)");
ABSL_FLAG(int, prefill, 80, "tokens prefilled per sequence before decoding");
ABSL_FLAG(int, drafts, 4, "drafts per VerifyDrafts (0: skip the verify timing)");
ABSL_FLAG(std::string, dtype, "BF16", "activation and output dtype: FP32, FP16 or BF16");
ABSL_FLAG(bool, profile_loop, false, "only run decode steps (for perf), no other phases");
ABSL_FLAG(int, scan_helpers, -1,
          "helper threads for the engine's activation checks and copies (-1: the default)");

namespace kvbuffer {
namespace {

using Clock = std::chrono::steady_clock;

// CPU time of the calling thread in microseconds (time spent descheduled on a busy machine is
// not counted, unlike wall time).
double ThreadCpuUs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

// Wall and thread CPU time of one call, in microseconds.
struct Timing {
  double wall = 0, cpu = 0;
};

class Stopwatch {
 public:
  Stopwatch() : wall_(Clock::now()), cpu_(ThreadCpuUs()) {}
  Timing Elapsed() const {
    return {std::chrono::duration<double, std::micro>(Clock::now() - wall_).count(),
            ThreadCpuUs() - cpu_};
  }

 private:
  Clock::time_point wall_;
  double cpu_;
};

// A backend that accepts every call and does no math.
class NullBackend : public Backend {
 public:
  std::string Name() const override { return "null"; }
  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>&,
                        const PoolSizes& sizes) override {
    config_ = config;
    sizes_ = sizes;
    return absl::OkStatus();
  }
  absl::Status RunLayerStep(const LayerStep&) override { return absl::OkStatus(); }
  absl::Status FoldBuffers(int32_t, std::span<const FoldItem>, std::span<const int32_t>) override {
    return absl::OkStatus();
  }
  absl::Status CommitConv(int32_t, std::span<const ConvCommitItem>) override {
    return absl::OkStatus();
  }
  absl::Status ResetConv(std::span<const int32_t>) override { return absl::OkStatus(); }
  absl::Status ReadState(int32_t, int32_t, float*) override { return absl::OkStatus(); }
  BackendMemory Memory() const override { return {}; }

 protected:
  ModelConfig config_;
  PoolSizes sizes_;
};

// The host side of CudaBackend::RunLayerStep without CUDA: the shared argument checks, one
// descriptor per item, the page table and descriptors packed into a staging buffer reused across
// calls (pinned memory there), and the activations and outputs copied through staging buffers
// unless they already lie in memory this backend handed out (AllocateHostBuffer: pinned memory
// that the GPU reads and writes directly). Declared without `override` so that the benchmark
// also builds against a Backend interface without host buffers (the "before" numbers).
class StagedBackend : public NullBackend {
 public:
  std::string Name() const override { return "staged"; }
  void* AllocateHostBuffer(size_t bytes) {
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
    if (p != nullptr) buffers_.push_back({p, bytes});
    return p;
  }
  void FreeHostBuffer(void* p) {
    for (size_t i = 0; i < buffers_.size(); ++i) {
      if (buffers_[i].first == p) {
        buffers_.erase(buffers_.begin() + i);
        break;
      }
    }
    std::free(p);
  }
  bool PrefersHostBufferInputs() const { return true; }

  absl::Status RunLayerStep(const LayerStep& step) override {
    if (absl::Status s = ValidateLayerStep(config_, sizes_, step); !s.ok()) return s;
    descs_.clear();
    for (const StepItem& it : step.items) {
      descs_.push_back({it.token_offset, it.num_tokens, it.state_slot,
                        (it.fold_first ? 1 : 0) | (it.state_is_new ? 2 : 0), it.buffer_rows,
                        it.page_offset, it.conv_slot, it.fold_tokens});
    }
    const size_t T = static_cast<size_t>(step.total_tokens);
    const size_t es = DTypeSize(step.in_dtype);
    const bool direct_in = Owned(step.qkv) && Owned(step.a) && Owned(step.b);
    const size_t parts[] = {step.page_table.size_bytes(), descs_.size() * sizeof(Desc),
                            direct_in ? 0 : T * config_.channels() * es,
                            direct_in ? 0 : T * config_.num_v_heads * es,
                            direct_in ? 0 : T * config_.num_v_heads * es};
    const void* src[] = {step.page_table.data(), descs_.data(), step.qkv, step.a, step.b};
    size_t total = 0;
    for (size_t p : parts) total += (p + 255) / 256 * 256;
    if (staging_in_.size() < total) staging_in_.resize(total + total / 4);
    size_t at = 0;
    for (int i = 0; i < 5; ++i) {
      if (parts[i] > 0) std::memcpy(staging_in_.data() + at, src[i], parts[i]);
      at += (parts[i] + 255) / 256 * 256;
    }
    if (!Owned(step.out)) {
      const size_t out_bytes = T * config_.out_elems() * DTypeSize(step.out_dtype);
      if (staging_out_.size() < out_bytes) staging_out_.resize(out_bytes + out_bytes / 4);
      std::memcpy(step.out, staging_out_.data(), out_bytes);
    }
    return absl::OkStatus();
  }

 private:
  struct Desc {  // the size of the CUDA kernels' StepDesc
    int32_t token_offset, num_tokens, state_slot, flags, buffer_rows, page_offset, conv_slot,
        fold_tokens;
  };
  bool Owned(const void* p) const {
    for (const auto& [data, bytes] : buffers_) {
      if (p >= data && p < data + bytes) return true;
    }
    return false;
  }
  std::vector<Desc> descs_;
  std::vector<uint8_t> staging_in_, staging_out_;
  std::vector<std::pair<uint8_t*, size_t>> buffers_;
};

DType ParseDType(const std::string& s) {
  return s == "FP32" ? DType::kFloat32 : s == "FP16" ? DType::kFloat16 : DType::kBFloat16;
}

EngineOptions Options(int32_t batch, int32_t layers, int32_t C) {
  EngineOptions o;
  ModelPreset("qwen3-next-80b-a3b", &o.model);
  o.model.num_layers = layers;
  o.flush_interval = C;
  o.stateless_limit = 64;
  o.max_drafts = std::min(4, C);
  o.max_sequences = batch;
  o.state_slots = batch;
  o.page_tokens = 16;
  o.buffer_pages = batch * 6;
  o.idle_ttl = absl::Hours(24);
  return o;
}

struct Batch {
  std::string qkv, a, b;
};

Batch RandomBatch(const ModelConfig& m, int64_t tokens, DType dtype, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](std::string& s, size_t n) {
    s.resize(n * DTypeSize(dtype));
    for (size_t i = 0; i < n; ++i) StoreFromFloat(s.data(), dtype, i, nd(rng));
  };
  Batch x;
  fill(x.qkv, static_cast<size_t>(tokens) * m.channels());
  fill(x.a, static_cast<size_t>(tokens) * m.num_v_heads);
  fill(x.b, static_cast<size_t>(tokens) * m.num_v_heads);
  return x;
}

// A call over sequences [first, first + count) with `tokens` tokens each at `position`.
LayerCall Call(const ModelConfig& m, int32_t first, int32_t count, int64_t position, int32_t tokens,
               const Batch& x, DType dtype) {
  LayerCall c;
  c.layer = 0;
  for (int32_t i = 0; i < count; ++i) {
    c.sequences.push_back({static_cast<uint64_t>(first + i + 1), position, tokens});
  }
  const int64_t total = static_cast<int64_t>(count) * tokens;
  c.qkv = {dtype, {total, m.channels()}, x.qkv.data(), x.qkv.size()};
  c.a = {dtype, {total, m.num_v_heads}, x.a.data(), x.a.size()};
  c.b = {dtype, {total, m.num_v_heads}, x.b.data(), x.b.size()};
  c.out_dtype = dtype;
  return c;
}

struct Stats {
  double median_us = 0, mean_us = 0, cpu_median_us = 0;
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Stats Summarise(const std::vector<Timing>& t) {
  Stats s;
  if (t.empty()) return s;
  std::vector<double> wall, cpu;
  double sum = 0;
  for (const Timing& x : t) {
    wall.push_back(x.wall);
    cpu.push_back(x.cpu);
    sum += x.wall;
  }
  s.mean_us = sum / t.size();
  s.median_us = Median(wall);
  s.cpu_median_us = Median(cpu);
  return s;
}

void Print(const std::string& backend, int32_t B, const std::string& what, const Stats& s) {
  std::printf(
      "%-7s B=%-5d %-16s median %8.1f us  mean %8.1f us  cpu median %8.1f us  (%.2f us/seq)\n",
      backend.c_str(), B, what.c_str(), s.median_us, s.mean_us, s.cpu_median_us, s.median_us / B);
}

std::unique_ptr<Backend> MakeBackend(const std::string& name) {
  if (name == "null") return std::make_unique<NullBackend>();
  if (name == "staged") return std::make_unique<StagedBackend>();
  if (name == "cpu") return MakeCpuBackend();
  return nullptr;
}

int RunOne(const std::string& backend, int32_t B) {
  const int32_t C = absl::GetFlag(FLAGS_flush_interval);
  const DType dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  const EngineOptions o = Options(B, absl::GetFlag(FLAGS_layers), C);
  const ModelConfig& m = o.model;
  auto made = Engine::Create(o, MakeBackend(backend));
  if (!made.ok()) {
    std::fprintf(stderr, "%s: %s\n", backend.c_str(), made.status().ToString().c_str());
    return 1;
  }
  Engine& e = **made;
  std::vector<uint64_t> ids(B);
  for (int32_t i = 0; i < B; ++i) ids[i] = i + 1;
  if (absl::Status s = e.Open("", ids); !s.ok()) {
    std::fprintf(stderr, "open: %s\n", s.ToString().c_str());
    return 1;
  }
  std::mt19937 rng(12345);
  // Prefill past the stateless limit (a state per sequence), 16 sequences per call.
  const int32_t P = absl::GetFlag(FLAGS_prefill);
  const int32_t group = std::min(16, B);
  const Batch pre = RandomBatch(m, static_cast<int64_t>(group) * P, dtype, rng);
  for (int32_t first = 0; first < B; first += group) {
    auto r = e.Prefill(Call(m, first, std::min(group, B - first), 0, P, pre, dtype));
    if (!r.ok()) {
      std::fprintf(stderr, "prefill: %s\n", r.status().ToString().c_str());
      return 1;
    }
  }
  std::vector<Batch> inputs;
  for (int i = 0; i < 4; ++i) inputs.push_back(RandomBatch(m, B, dtype, rng));
  int64_t position = P;
  auto decode = [&](int32_t steps, std::vector<Timing>* us) -> bool {
    for (int32_t s = 0; s < steps; ++s, ++position) {
      const LayerCall call = Call(m, 0, B, position, 1, inputs[s % inputs.size()], dtype);
      const Stopwatch watch;
      auto r = e.DecodeStep(call);
      const Timing t = watch.Elapsed();
      if (!r.ok()) {
        std::fprintf(stderr, "decode: %s\n", r.status().ToString().c_str());
        return false;
      }
      if (us != nullptr) us->push_back(t);
    }
    return true;
  };
  // Decode: warm-up, then whole flush cycles on every layer would cost L times as much; layer 0
  // is the one timed (as in tp_bench), other layers' cursors are untouched.
  std::vector<Timing> dec;
  if (!decode(2 * C, nullptr)) return 1;
  if (!decode(absl::GetFlag(FLAGS_cycles) * C, &dec)) return 1;
  Print(backend, B, "DecodeStep", Summarise(dec));
  if (absl::GetFlag(FLAGS_profile_loop)) return 0;

  // VerifyDrafts of m drafts then CommitDrafts of all of them, on a 1-layer engine (a commit
  // needs every layer verified).
  const int32_t D = absl::GetFlag(FLAGS_drafts);
  if (D > 0) {
    EngineOptions o1 = o;
    o1.model.num_layers = 1;
    auto made1 = Engine::Create(o1, MakeBackend(backend));
    if (!made1.ok()) return 1;
    Engine& e1 = **made1;
    if (!e1.Open("", ids).ok()) return 1;
    const Batch drafts = RandomBatch(m, static_cast<int64_t>(B) * D, dtype, rng);
    std::vector<Timing> ver, com;
    int64_t pos = 0;
    for (int32_t s = 0; s < 3 * C; ++s) {
      const LayerCall call = Call(m, 0, B, pos, D, drafts, dtype);
      const Stopwatch verify_watch;
      auto r = e1.VerifyDrafts(call);
      const Timing tv = verify_watch.Elapsed();
      if (!r.ok()) {
        std::fprintf(stderr, "verify: %s\n", r.status().ToString().c_str());
        return 1;
      }
      std::vector<CommitItem> items(B);
      for (int32_t i = 0; i < B; ++i) items[i] = {static_cast<uint64_t>(i + 1), pos, D};
      const Stopwatch commit_watch;
      absl::Status c = e1.CommitDrafts("", items);
      const Timing tc = commit_watch.Elapsed();
      if (!c.ok()) {
        std::fprintf(stderr, "commit: %s\n", c.ToString().c_str());
        return 1;
      }
      pos += D;
      if (s >= C) {
        ver.push_back(tv);
        com.push_back(tc);
      }
    }
    Print(backend, B, absl::StrFormat("VerifyDrafts(%d)", D), Summarise(ver));
    Print(backend, B, "CommitDrafts", Summarise(com));
  }
  return 0;
}

// Sets the engine's scan helpers where this build has them (the "before" build has not).
void SetScanHelpers(int helpers) {
#if defined(KVB_HAVE_ACTIVATION_SCAN)
  if (helpers >= 0) SetActivationScanHelpers(helpers);
#else
  (void)helpers;
#endif
}

int Run() {
  SetScanHelpers(absl::GetFlag(FLAGS_scan_helpers));
  std::printf("engine_host_bench: Qwen3-Next shapes, L=%d held (layer 0 timed), C=%d, %s in/out\n",
              absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_flush_interval),
              absl::GetFlag(FLAGS_dtype).c_str());
  const std::vector<std::string> backends =
      absl::StrSplit(absl::GetFlag(FLAGS_backend), ',', absl::SkipEmpty());
  const std::vector<std::string> batches =
      absl::StrSplit(absl::GetFlag(FLAGS_batch), ',', absl::SkipEmpty());
  for (const std::string& backend : backends) {
    if (MakeBackend(backend) == nullptr) {
      std::fprintf(stderr, "unknown backend %s\n", backend.c_str());
      return 2;
    }
    for (const std::string& b : batches) {
      if (int rc = RunOne(backend, std::stoi(b)); rc != 0) return rc;
    }
  }
  return 0;
}

}  // namespace
}  // namespace kvbuffer

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvbuffer::Run();
}
