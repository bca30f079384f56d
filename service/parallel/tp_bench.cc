// tp_bench: decode step time at batch B on one linear-attention layer with TP = 1 (one GPU) and
// TP = 2 (two GPUs of this host), in the same run and in lockstep on the same inputs, through the
// engine (host activations in, host outputs back, as the service pays them):
//   tp1          Engine over one CudaBackend on GPU 0 (the engine checks and stages the
//                activations, with its scan helpers);
//   tp2          Engine over the NCCL group, one process driving both GPUs (mode A), as the
//                server runs it: direct host steps, each rank on its own thread copies and
//                checks its slice, uploads it over its own link, downloads its heads in place;
//   tp2-protocol the same group with every step through the rank protocol: activations copied
//                once to GPU 0 and scattered with NCCL, outputs gathered with NCCL (mode B's path);
//   tp1-fanout   (--tp1_fanout) one CudaBackend behind the same per-rank host path as tp2 (a
//                ShardedBackend of 1 shard that checks values), to separate path from scaling;
//   tp2-host     (--host_sliced) a ShardedBackend of two CudaBackends, the tp2 path without an
//                NCCL group.
// Every TP = 2 output is checked against TP = 1. Also reports the sequences that fit per GPU at
// both sizes, and checks it by allocating. Prints a table and writes JSON (--json).
// NCCL_NVLS_ENABLE=0 is kept (NVLink multicast off).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "service/engine/activation_scan.h"
#include "service/engine/cuda/cuda_backend.h"
#include "service/engine/engine.h"
#include "service/parallel/nccl_group.h"
#include "service/parallel/nccl_transport.h"
#include "service/parallel/sharded_backend.h"

ABSL_FLAG(int, batch, 256, "sequences decoding together (B)");
ABSL_FLAG(int, layers, 36, "linear-attention layers held per sequence (memory); layer 0 is timed");
ABSL_FLAG(int, flush_interval, 16, "C");
ABSL_FLAG(int, cycles, 8, "timed flush cycles (steps = cycles * C)");
ABSL_FLAG(int, prefill, 80, "tokens prefilled per sequence before decoding (gives it a state)");
ABSL_FLAG(std::string, dtype, "BF16", "activation and output dtype: FP32, FP16 or BF16");
ABSL_FLAG(bool, host_sliced, false, "also time a ShardedBackend of 2 GPUs (no NCCL group)");
ABSL_FLAG(bool, protocol, true, "also time TP = 2 with steps through the NCCL rank protocol");
ABSL_FLAG(bool, tp1_fanout, false, "also time TP = 1 through the per-rank host path of tp2");
ABSL_FLAG(int, scan_helpers, -1,
          "helper threads of the engine's activation scans (tp1's check and staging); -1: default");
ABSL_FLAG(int, spin_us, 200, "how long tp2's rank threads spin for the next step (microseconds)");
ABSL_FLAG(int, copy_threads, 0,
          "threads per rank copying activations in tp2 and tp1-fanout (0: the default)");
ABSL_FLAG(bool, fit_check, true, "check the sequences that fit by allocating");
ABSL_FLAG(std::string, json, "", "write the results here");
ABSL_FLAG(bool, profile, false,
          "time the phases of tp1's steps (CudaBackendOptions::profile; adds events to tp1)");

namespace kvbuffer::parallel {
namespace {

using Clock = std::chrono::steady_clock;

DType ParseDType(const std::string& s) {
  return s == "FP32" ? DType::kFloat32 : s == "FP16" ? DType::kFloat16 : DType::kBFloat16;
}

DeviceStepFn DeviceStep() {
#if defined(KVB_CUDA_BACKEND_DEVICE_STEP)
  return [](Backend& b, const LayerStep& step, void* stream) {
    return RunLayerStepOnDevice(b, step, stream);
  };
#else
  return nullptr;
#endif
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
  o.buffer_pages = batch * 6;  // a prefill tail plus decode rows, with room
  o.idle_ttl = absl::Hours(24);
  return o;
}

// Activations for B sequences of one token each (or T tokens each for a prefill).
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

LayerCall Call(const ModelConfig& m, int32_t batch, int64_t position, int32_t tokens,
               const Batch& x, DType dtype) {
  LayerCall c;
  c.layer = 0;
  for (int32_t i = 0; i < batch; ++i)
    c.sequences.push_back({static_cast<uint64_t>(i + 1), position, tokens});
  const int64_t total = static_cast<int64_t>(batch) * tokens;
  c.qkv = {dtype, {total, m.channels()}, x.qkv.data(), x.qkv.size()};
  c.a = {dtype, {total, m.num_v_heads}, x.a.data(), x.a.size()};
  c.b = {dtype, {total, m.num_v_heads}, x.b.data(), x.b.size()};
  c.out_dtype = dtype;
  return c;
}

double MaxRelDiff(const Tensor& want, const Tensor& got) {
  const size_t n = want.bytes.size() / DTypeSize(want.dtype);
  double scale = 0, worst = 0;
  for (size_t i = 0; i < n; ++i) {
    scale = std::max(scale,
                     std::abs(static_cast<double>(LoadAsFloat(want.bytes.data(), want.dtype, i))));
  }
  for (size_t i = 0; i < n; ++i) {
    const double x = LoadAsFloat(want.bytes.data(), want.dtype, i);
    const double y = LoadAsFloat(got.bytes.data(), got.dtype, i);
    worst = std::max(worst, std::abs(x - y) / std::max(std::abs(x), 1e-3 * scale + 1e-30));
  }
  return worst;
}

struct Timed {
  std::string name;
  std::unique_ptr<Engine> engine;
  std::vector<double> ms;
  double worst_diff = 0;
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / v.size();
}

// Per-GPU bytes of one decoding sequence at this size (state, conv window, its pages).
int64_t PerSequenceBytes(const EngineOptions& o, int32_t tp) {
  ModelConfig shard = o.model;
  shard.num_k_heads /= tp;
  shard.num_v_heads /= tp;
  PoolSizes s;
  s.page_tokens = o.page_tokens;
  s.max_drafts = o.max_drafts;
  s.buffer_dtype = o.buffer_dtype;
  s.conv_dtype = o.conv_dtype;
  const PoolElementBytes b = ComputePoolElementBytes(shard, s);
  const int64_t pages = (o.flush_interval + o.max_drafts + o.page_tokens - 1) / o.page_tokens;
  return b.state_slot + b.conv_slot + pages * b.buffer_page;
}

int Run() {
  KeepNvlinkMulticastOff();
  if (absl::GetFlag(FLAGS_scan_helpers) >= 0) {
    SetActivationScanHelpers(absl::GetFlag(FLAGS_scan_helpers));
  }
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  if (gpus < 2) {
    std::fprintf(stderr, "tp_bench needs 2 GPUs, found %d\n", gpus);
    return 2;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const int32_t B = absl::GetFlag(FLAGS_batch);
  const int32_t C = absl::GetFlag(FLAGS_flush_interval);
  const DType dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  const EngineOptions o = Options(B, absl::GetFlag(FLAGS_layers), C);
  const ModelConfig& m = o.model;
  const bool device_step = static_cast<bool>(DeviceStep());
  std::printf(
      "tp_bench: %s x2, NCCL %s, B=%d, L=%d (layer 0 timed), C=%d, %s, device step %s, %d host "
      "threads, scan helpers %d, copy threads per rank %d (tp2) %d (tp1-fanout)\n",
      prop.name, NcclVersionString().c_str(), B, m.num_layers, C, DTypeName(dtype),
      device_step ? "on" : "off (staged through host)",
      static_cast<int>(std::thread::hardware_concurrency()), ActivationScanHelpers(),
      absl::GetFlag(FLAGS_copy_threads) > 0 ? absl::GetFlag(FLAGS_copy_threads)
                                            : kDefaultFanoutLanes,
      absl::GetFlag(FLAGS_copy_threads) > 0 ? absl::GetFlag(FLAGS_copy_threads)
                                            : kDefaultFanoutLanes);

  std::vector<Timed> runs;
  Backend* tp1_backend = nullptr;        // for its profile
  std::vector<Backend*> tp2_backends;    // tp2's ranks, for theirs
  TpBackend* tp2_group = nullptr;        // for its direct-step stats
  ShardedBackend* tp1_fanout = nullptr;  // for its step stats
  {
    CudaBackendOptions co;
    co.device = 0;
    co.profile = absl::GetFlag(FLAGS_profile);
    std::unique_ptr<Backend> b = MakeCudaBackend(co);
    tp1_backend = b.get();
    auto e = Engine::Create(o, std::move(b));
    if (!e.ok()) return std::fprintf(stderr, "tp1: %s\n", e.status().ToString().c_str()), 1;
    runs.push_back({"tp1", *std::move(e), {}, 0});
  }
  if (absl::GetFlag(FLAGS_tp1_fanout)) {
    ShardedBackendOptions so;
    so.num_shards = 1;
    so.concurrent = true;
    so.check_values_in_shards = true;
    so.copy_threads = absl::GetFlag(FLAGS_copy_threads);
    so.scratch_allocator = PinnedHostAllocator();
    so.make_shard = [](int32_t) { return MakeCudaBackend(0); };
    auto b = ShardedBackend::Create(std::move(so));
    if (!b.ok()) return std::fprintf(stderr, "tp1-fanout: %s\n", b.status().ToString().c_str()), 1;
    tp1_fanout = b->get();
    auto e = Engine::Create(o, *std::move(b));
    if (!e.ok()) return std::fprintf(stderr, "tp1-fanout: %s\n", e.status().ToString().c_str()), 1;
    runs.push_back({"tp1-fanout", *std::move(e), {}, 0});
  }
  for (const bool direct : {true, false}) {
    if (!direct && !absl::GetFlag(FLAGS_protocol)) continue;
    const char* name = direct ? "tp2" : "tp2-protocol";
    NcclGroupOptions g;
    g.make_backend = [direct, &tp2_backends](int32_t, int device) -> std::unique_ptr<Backend> {
      CudaBackendOptions co;
      co.device = device;
      co.profile = direct && absl::GetFlag(FLAGS_profile);
      std::unique_ptr<Backend> b = MakeCudaBackend(co);
      if (direct) tp2_backends.push_back(b.get());
      return b;
    };
    g.device_step = DeviceStep();
    g.tp.direct_host_steps = direct;
    g.tp.direct_copy_threads = absl::GetFlag(FLAGS_copy_threads);
    g.tp.direct_spin = absl::Microseconds(absl::GetFlag(FLAGS_spin_us));
    auto b = MakeNcclGroupInProcess({0, 1}, std::move(g));
    if (!b.ok()) return std::fprintf(stderr, "%s: %s\n", name, b.status().ToString().c_str()), 1;
    if (direct) tp2_group = b->get();
    auto e = Engine::Create(o, *std::move(b));
    if (!e.ok()) return std::fprintf(stderr, "%s: %s\n", name, e.status().ToString().c_str()), 1;
    runs.push_back({name, *std::move(e), {}, 0});
  }
  if (absl::GetFlag(FLAGS_host_sliced)) {
    ShardedBackendOptions so;
    so.num_shards = 2;
    so.concurrent = true;
    so.check_values_in_shards = true;
    so.scratch_allocator = PinnedHostAllocator();
    so.make_shard = [](int32_t s) { return MakeCudaBackend(s); };
    auto b = ShardedBackend::Create(std::move(so));
    if (!b.ok()) return std::fprintf(stderr, "tp2-host: %s\n", b.status().ToString().c_str()), 1;
    auto e = Engine::Create(o, *std::move(b));
    if (!e.ok()) return std::fprintf(stderr, "tp2-host: %s\n", e.status().ToString().c_str()), 1;
    runs.push_back({"tp2-host", *std::move(e), {}, 0});
  }

  // Sequences with a state: prefill past the stateless limit.
  std::vector<uint64_t> ids(B);
  for (int32_t i = 0; i < B; ++i) ids[i] = i + 1;
  std::mt19937 rng(12345);
  const int32_t P = absl::GetFlag(FLAGS_prefill);
  const Batch pre = RandomBatch(m, static_cast<int64_t>(B) * P, dtype, rng);
  for (Timed& t : runs) {
    if (!t.engine->Open("", ids).ok()) return std::fprintf(stderr, "%s: open\n", t.name.c_str()), 1;
    auto r = t.engine->Prefill(Call(m, B, 0, P, pre, dtype));
    if (!r.ok())
      return std::fprintf(stderr, "%s: prefill: %s\n", t.name.c_str(),
                          r.status().ToString().c_str()),
             1;
  }

  // Inputs rotated so that caches do not flatter.
  std::vector<Batch> inputs;
  for (int i = 0; i < 4; ++i) inputs.push_back(RandomBatch(m, B, dtype, rng));
  const int32_t warm = 2 * C;
  const int32_t steps = absl::GetFlag(FLAGS_cycles) * C;
  int64_t position = P;
  CudaStepProfile before;
  std::vector<CudaStepProfile> tp2_before;
  HostStepFanoutStats tp2_fan_before, tp1_fan_before;
  for (int32_t s = 0; s < warm + steps; ++s, ++position) {
    if (s == warm) {
      before = GetCudaStepProfile(*tp1_backend);
      if (tp2_group != nullptr) tp2_fan_before = tp2_group->DirectStepStats();
      if (tp1_fanout != nullptr) tp1_fan_before = tp1_fanout->StepStats();
      tp2_before.clear();
      for (Backend* b : tp2_backends) tp2_before.push_back(GetCudaStepProfile(*b));
    }
    const LayerCall call = Call(m, B, position, 1, inputs[s % inputs.size()], dtype);
    Tensor reference;
    for (Timed& t : runs) {
      const auto t0 = Clock::now();
      auto r = t.engine->DecodeStep(call);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (!r.ok()) {
        std::fprintf(stderr, "%s: step %d: %s\n", t.name.c_str(), s, r.status().ToString().c_str());
        return 1;
      }
      if (s >= warm) t.ms.push_back(ms);
      if (&t == &runs[0]) {
        reference = std::move(r->out);
      } else {
        t.worst_diff = std::max(t.worst_diff, MaxRelDiff(reference, r->out));
      }
    }
  }

  if (absl::GetFlag(FLAGS_profile)) {
    // Where tp1's step goes: the engine around the backend, the backend's host work, and the
    // device phases the backend waits for.
    const CudaStepProfile after = GetCudaStepProfile(*tp1_backend);
    const double n = static_cast<double>(std::max<int64_t>(after.steps - before.steps, 1));
    const double host = (after.host_ms - before.host_ms) / n;
    const double wait = (after.wait_ms - before.wait_ms) / n;
    std::printf(
        "\ntp1 profile, ms per step (%lld steps): DecodeStep %.4f = engine host %.4f + backend "
        "host %.4f + wait %.4f; device: upload %.4f, kernels %.4f, download %.4f\n",
        static_cast<long long>(after.steps - before.steps), Mean(runs[0].ms),
        Mean(runs[0].ms) - host - wait, host, wait, (after.upload_ms - before.upload_ms) / n,
        (after.kernels_ms - before.kernels_ms) / n, (after.download_ms - before.download_ms) / n);
    // The per-rank host path: copying and checking the slices, then everything to the end of
    // the ranks' steps; the rest of DecodeStep is the engine's own (lookups, output block, the
    // result's copy).
    auto fan = [&](const char* name, const Timed* t, HostStepFanoutStats a,
                   const HostStepFanoutStats& b) {
      if (t == nullptr) return;
      const double k = static_cast<double>(std::max<int64_t>(a.steps - b.steps, 1));
      std::printf("%s, ms per step: DecodeStep %.4f = engine %.4f + copy/check %.4f + ranks %.4f\n",
                  name, Mean(t->ms), Mean(t->ms) - (a.total_ms - b.total_ms) / k,
                  (a.prepare_ms - b.prepare_ms) / k,
                  (a.total_ms - b.total_ms - a.prepare_ms + b.prepare_ms) / k);
    };
    auto find = [&](const char* name) -> const Timed* {
      for (const Timed& t : runs) {
        if (t.name == name) return &t;
      }
      return nullptr;
    };
    if (tp1_fanout != nullptr)
      fan("tp1-fanout", find("tp1-fanout"), tp1_fanout->StepStats(), tp1_fan_before);
    if (tp2_group != nullptr) fan("tp2", find("tp2"), tp2_group->DirectStepStats(), tp2_fan_before);
    // tp2's ranks, each on its own thread: the host work and the device phases of its shard.
    for (size_t r = 0; r < tp2_backends.size() && r < tp2_before.size(); ++r) {
      const CudaStepProfile a = GetCudaStepProfile(*tp2_backends[r]);
      const CudaStepProfile& b = tp2_before[r];
      const double k = static_cast<double>(std::max<int64_t>(a.steps - b.steps, 1));
      std::printf(
          "tp2 rank %zu, ms per step: backend host %.4f + wait %.4f; device: upload %.4f, "
          "kernels %.4f, download %.4f\n",
          r, (a.host_ms - b.host_ms) / k, (a.wait_ms - b.wait_ms) / k,
          (a.upload_ms - b.upload_ms) / k, (a.kernels_ms - b.kernels_ms) / k,
          (a.download_ms - b.download_ms) / k);
    }
  }
  const double tp1 = Mean(runs[0].ms);
  std::printf("\n%-12s %12s %12s %10s %14s\n", "config", "median ms", "mean ms", "vs tp1",
              "max rel diff");
  std::string configs;
  for (const Timed& t : runs) {
    std::printf("%-12s %12.4f %12.4f %10.3f %14.3g\n", t.name.c_str(), Median(t.ms), Mean(t.ms),
                Mean(t.ms) / tp1, t.worst_diff);
    configs += absl::StrFormat(
        "%s\n  {\"name\": \"%s\", \"median_ms\": %.5f, \"mean_ms\": %.5f, \"vs_tp1\": %.4f, "
        "\"max_rel_diff\": %.3g}",
        configs.empty() ? "" : ",", t.name, Median(t.ms), Mean(t.ms), Mean(t.ms) / tp1,
        t.worst_diff);
  }

  // Sequences that fit per GPU (90% of the free memory of GPU 1, which holds only TP = 2 pools).
  size_t free_b = 0, total_b = 0;
  cudaSetDevice(1);
  cudaMemGetInfo(&free_b, &total_b);
  const int64_t per1 = PerSequenceBytes(o, 1), per2 = PerSequenceBytes(o, 2);
  const int64_t budget = static_cast<int64_t>(total_b * 0.9) - (total_b - free_b);
  const int64_t fit1 = budget / per1, fit2 = budget / per2;
  std::printf(
      "\nper-GPU bytes per sequence: tp1 %lld, tp2 %lld; fit in %.1f GiB: tp1 %lld, tp2 %lld "
      "(x%.2f)\n",
      static_cast<long long>(per1), static_cast<long long>(per2), budget / 1073741824.0,
      static_cast<long long>(fit1), static_cast<long long>(fit2),
      static_cast<double>(fit2) / std::max<int64_t>(fit1, 1));
  std::string fit_check = "skipped";
  if (absl::GetFlag(FLAGS_fit_check)) {
    runs.clear();  // give the memory back first
    cudaSetDevice(0);
    cudaMemGetInfo(&free_b, &total_b);
    const int64_t n = static_cast<int64_t>(free_b * 0.85) / per1;  // fits one GPU at TP = 1
    auto sized = [&](int64_t seqs) {
      EngineOptions x = Options(static_cast<int32_t>(seqs), m.num_layers, C);
      x.buffer_pages = static_cast<int32_t>(seqs * ((C + x.max_drafts + 15) / 16));
      return x;
    };
    auto one = Engine::Create(sized(2 * n), MakeCudaBackend(0));
    const bool tp1_refuses_double = !one.ok();
    one = absl::CancelledError("released");
    NcclGroupOptions g;
    g.make_backend = [](int32_t, int device) { return MakeCudaBackend(device); };
    auto b = MakeNcclGroupInProcess({0, 1}, std::move(g));
    bool tp2_holds_double = false;
    if (b.ok()) tp2_holds_double = Engine::Create(sized(2 * n), *std::move(b)).ok();
    fit_check = absl::StrFormat("%lld sequences: tp1 %s, tp2 %s", static_cast<long long>(2 * n),
                                tp1_refuses_double ? "refused" : "accepted(!)",
                                tp2_holds_double ? "allocated" : "refused(!)");
    std::printf("fit check, %s\n", fit_check.c_str());
  }

  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream f(path);
    f << absl::StrFormat(
        "{\"card\": \"%s\", \"gpus\": 2, \"nccl\": \"%s\", \"batch\": %d, \"layers\": %d, "
        "\"flush_interval\": %d, \"dtype\": \"%s\", \"device_step\": %s, \"steps\": %d,\n",
        prop.name, NcclVersionString(), B, m.num_layers, C, DTypeName(dtype),
        device_step ? "true" : "false", steps);
    f << " \"configs\": [" << configs << "],\n";
    f << absl::StrFormat(
        " \"per_gpu_bytes_per_sequence\": {\"tp1\": %lld, \"tp2\": %lld}, \"fit\": {\"tp1\": %lld, "
        "\"tp2\": %lld}, \"fit_check\": \"%s\"}\n",
        static_cast<long long>(per1), static_cast<long long>(per2), static_cast<long long>(fit1),
        static_cast<long long>(fit2), fit_check);
  }
  return 0;
}

}  // namespace
}  // namespace kvbuffer::parallel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvbuffer::parallel::Run();
}
