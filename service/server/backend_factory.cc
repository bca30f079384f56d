#include "service/server/backend_factory.h"

#include <set>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "service/parallel/head_shard.h"
#include "service/parallel/sharded_backend.h"

#if defined(KVB_HAVE_CUDA)
#include "service/engine/cuda/cuda_backend.h"
#endif
#if defined(KVB_HAVE_CUDA) && defined(KVB_HAVE_NCCL)
#include "service/parallel/bootstrap/tp_leader.h"
#include "service/parallel/nccl_group.h"
#include "service/parallel/nccl_transport.h"
#endif

namespace kvbuffer::server {

namespace {

absl::StatusOr<std::unique_ptr<Backend>> MakeCuda(const BackendChoice& choice) {
  if (choice.cuda_prefill != "exact" && choice.cuda_prefill != "tensor_core") {
    return absl::InvalidArgumentError(absl::StrCat("--cuda_prefill is \"", choice.cuda_prefill,
                                                   "\", expected exact or tensor_core"));
  }
#if defined(KVB_HAVE_CUDA)
  const int gpus = CudaDeviceCount();
  if (choice.device < 0 || choice.device >= gpus) {
    return absl::FailedPreconditionError(absl::StrCat("--backend=cuda: GPU ", choice.device,
                                                      " is not visible (", gpus, " GPU(s) found)"));
  }
  CudaBackendOptions options;
  options.device = choice.device;
  options.prefill =
      choice.cuda_prefill == "tensor_core" ? CudaPrefillMode::kTensorCore : CudaPrefillMode::kExact;
  std::unique_ptr<Backend> backend = MakeCudaBackend(options);
  if (!backend) return absl::InternalError("could not create the CUDA backend");
  return backend;
#else
  return absl::FailedPreconditionError(
      "--backend=cuda: this build has no CUDA backend (configure with CUDA to get one)");
#endif
}

// "--tensor_parallel=N --tp_mode=M", for messages.
std::string TpFlags(const TensorParallelChoice& tp) {
  return absl::StrCat("--tensor_parallel=", tp.size, " --tp_mode=", tp.mode);
}

// N CPU shards in this process.
absl::StatusOr<ServingBackend> MakeSimulated(const BackendChoice& choice) {
  if (choice.name != "cpu" && choice.name != "auto") {
    return absl::InvalidArgumentError(absl::StrCat(TpFlags(choice.tp),
                                                   " runs CPU shards; --backend is \"", choice.name,
                                                   "\", use cpu or auto"));
  }
  absl::StatusOr<std::unique_ptr<parallel::ShardedBackend>> b =
      parallel::MakeShardedCpuBackend(choice.tp.size);
  if (!b.ok()) return b.status();
  ServingBackend out;
  out.backend = *std::move(b);
  out.tensor_parallel_size = choice.tp.size;
  out.layout = absl::StrCat(choice.tp.size, " simulated CPU shards in this process");
  return out;
}

// The GPUs of the ranks this process drives: every rank's (threads) or rank 0's (processes).
std::vector<int> LocalDevices(const BackendChoice& choice) {
  const TensorParallelChoice& tp = choice.tp;
  if (tp.mode == "processes") return {tp.devices.empty() ? choice.device : tp.devices[0]};
  if (!tp.devices.empty()) return tp.devices;
  std::vector<int> devices;
  for (int r = 0; r < tp.size; ++r) devices.push_back(r);
  return devices;
}

// A group over NCCL: mode threads (every rank here) or processes (rank 0 here).
absl::StatusOr<ServingBackend> MakeNcclGroup(const BackendChoice& choice,
                                             const EngineOptions& engine,
                                             std::function<void(const absl::Status&)> on_broken) {
  const TensorParallelChoice& tp = choice.tp;
  if (choice.name != "cuda" && choice.name != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat(TpFlags(tp), " shards over GPUs; --backend is \"", choice.name,
                     "\", use cuda or auto (or --tp_mode=simulated for CPU shards)"));
  }
  if (choice.cuda_prefill != "exact" && choice.cuda_prefill != "tensor_core") {
    return absl::InvalidArgumentError(absl::StrCat("--cuda_prefill is \"", choice.cuda_prefill,
                                                   "\", expected exact or tensor_core"));
  }
  if (tp.mode == "processes" && choice.cuda_prefill != "exact") {
    return absl::InvalidArgumentError(
        "--tp_mode=processes: kvbuffer-tp-worker ranks prefill exactly; use --cuda_prefill=exact");
  }
  const std::vector<int> devices = LocalDevices(choice);
  if (tp.mode == "threads" && static_cast<int32_t>(devices.size()) != tp.size) {
    return absl::InvalidArgumentError(absl::StrCat(TpFlags(tp), ": --tp_devices names ",
                                                   devices.size(), " GPU(s), expected ", tp.size));
  }
  if (std::set<int>(devices.begin(), devices.end()).size() != devices.size()) {
    return absl::InvalidArgumentError(absl::StrCat(TpFlags(tp), ": --tp_devices repeats a GPU (",
                                                   absl::StrJoin(devices, ","), ")"));
  }
#if defined(KVB_HAVE_CUDA) && defined(KVB_HAVE_NCCL)
  const int gpus = CudaDeviceCount();
  for (int d : devices) {
    if (d < 0 || d >= gpus) {
      return absl::FailedPreconditionError(absl::StrCat(TpFlags(tp), " needs GPU(s) ",
                                                        absl::StrJoin(devices, ","), "; ", gpus,
                                                        " GPU(s) visible"));
    }
  }
  parallel::KeepNvlinkMulticastOff();
  parallel::NcclGroupOptions group;
  group.tp.op_timeout = tp.op_timeout;
  group.tp.direct_host_steps = tp.direct_host_steps;
  group.tp.on_broken = std::move(on_broken);
  group.init_timeout = tp.init_timeout;
  const CudaPrefillMode prefill =
      choice.cuda_prefill == "tensor_core" ? CudaPrefillMode::kTensorCore : CudaPrefillMode::kExact;
  group.make_backend = [prefill, timeout = tp.op_timeout](int32_t, int device) {
    CudaBackendOptions o;
    o.device = device;
    o.prefill = prefill;
    o.sync_timeout = timeout;  // a hung rank's GPU breaks the group instead of hanging it
    return MakeCudaBackend(o);
  };
#if defined(KVB_CUDA_BACKEND_DEVICE_STEP)
  group.device_step = [](Backend& b, const LayerStep& step, void* stream) {
    return RunLayerStepOnDevice(b, step, stream);
  };
#endif
  ServingBackend out;
  out.tensor_parallel_size = tp.size;
  if (tp.mode == "threads") {
    absl::StatusOr<std::unique_ptr<parallel::TpBackend>> b =
        parallel::MakeNcclGroupInProcess(devices, std::move(group));
    if (!b.ok()) {
      return absl::Status(b.status().code(),
                          absl::StrCat(TpFlags(tp), " on GPUs ", absl::StrJoin(devices, ","), ": ",
                                       b.status().message()));
    }
    out.backend = *std::move(b);
    out.layout =
        absl::StrCat(tp.size, " ranks on threads of this process, GPUs ",
                     absl::StrJoin(devices, ","), ", NCCL ", parallel::NcclVersionString(),
                     tp.direct_host_steps ? ", direct host steps" : ", steps through NCCL");
    return out;
  }
  parallel::TpLeaderOptions leader_options;
  leader_options.bootstrap_address = tp.bootstrap;
  leader_options.world_size = tp.size;
  leader_options.device = devices[0];
  leader_options.engine = engine;
  leader_options.shard_backend = "cuda";
  leader_options.group = std::move(group);
  absl::StatusOr<std::unique_ptr<parallel::TpLeader>> leader =
      parallel::TpLeader::Start(std::move(leader_options));
  if (!leader.ok()) {
    return absl::Status(
        leader.status().code(),
        absl::StrCat(TpFlags(tp), ": rank 0 on GPU ", devices[0], ", bootstrap at ", tp.bootstrap,
                     " (ranks > 0 run "
                     "kvbuffer-tp-worker --leader=HOST:PORT --device=D): ",
                     leader.status().message()));
  }
  out.backend = (*leader)->TakeBackend();
  out.layout =
      absl::StrCat(tp.size, " processes, rank 0 on GPU ", devices[0], ", bootstrap on port ",
                   (*leader)->bootstrap_port(), ", NCCL ", parallel::NcclVersionString());
  out.keep_alive = std::shared_ptr<parallel::TpLeader>(*std::move(leader));
  return out;
#else
  (void)engine;
  (void)on_broken;
  return absl::FailedPreconditionError(
      absl::StrCat(TpFlags(tp),
                   ": this build has no NCCL (tensor parallelism over GPUs needs CUDA and NCCL "
                   "when configuring); --tp_mode=simulated runs the head shards on the CPU"));
#endif
}

}  // namespace

bool BuiltWithCuda() {
#if defined(KVB_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const BackendChoice& choice) {
  if (choice.name == "cpu") return MakeCpuBackend();
  if (choice.name == "cuda") return MakeCuda(choice);
  if (choice.name == "auto") {
#if defined(KVB_HAVE_CUDA)
    if (choice.device >= 0 && choice.device < CudaDeviceCount()) return MakeCuda(choice);
#endif
    return MakeCpuBackend();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--backend is \"", choice.name, "\", expected auto, cpu or cuda"));
}

bool BuiltWithNccl() {
#if defined(KVB_HAVE_CUDA) && defined(KVB_HAVE_NCCL)
  return true;
#else
  return false;
#endif
}

absl::StatusOr<ServingBackend> MakeServingBackend(
    const BackendChoice& choice, const EngineOptions& engine,
    std::function<void(const absl::Status&)> on_broken) {
  const TensorParallelChoice& tp = choice.tp;
  if (tp.size <= 1) {
    absl::StatusOr<std::unique_ptr<Backend>> b = MakeBackend(choice);
    if (!b.ok()) return b.status();
    ServingBackend out;
    out.backend = *std::move(b);
    out.layout = "one backend";
    return out;
  }
  if (absl::Status s = parallel::ValidateShardCount(engine.model, tp.size); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tensor_parallel=", tp.size, ": ", s.message()));
  }
  if (tp.mode == "simulated") return MakeSimulated(choice);
  if (tp.mode == "threads" || tp.mode == "processes") {
    return MakeNcclGroup(choice, engine, std::move(on_broken));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--tp_mode is \"", tp.mode, "\", expected threads, processes or simulated"));
}

void BrokenGroupRelay::Report(const absl::Status& why) {
  absl::MutexLock lock(&mu_);
  if (!broken_.ok()) return;
  broken_ = why.ok() ? absl::UnknownError("tensor-parallel group broken") : why;
  if (sink_) {
    delivered_ = true;
    sink_(broken_);
  }
}

void BrokenGroupRelay::Attach(std::function<void(const absl::Status&)> sink) {
  absl::MutexLock lock(&mu_);
  sink_ = std::move(sink);
  if (sink_ && !broken_.ok() && !delivered_) {
    delivered_ = true;
    sink_(broken_);
  }
}

absl::Status BrokenGroupRelay::status() const {
  absl::MutexLock lock(&mu_);
  return broken_;
}

}  // namespace kvbuffer::server
