// Picks and creates the engine's Backend from the --backend and --tensor_parallel flags.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"
#include "service/engine/engine_options.h"

namespace kvbuffer::server {

// Heads sharded over several backends (service/parallel/README.md), one endpoint for all.
struct TensorParallelChoice {
  int32_t size = 1;  // ranks N (must divide the model's key heads); 1: no tensor parallelism
  // "threads": this process drives N GPUs over NCCL; "processes": this process is rank 0 on one
  // GPU and ranks > 0 are kvbuffer-tp-worker processes that join over `bootstrap`; "simulated":
  // N CPU shards in this process (ShardedBackend, no NCCL; bit-exact with N = 1).
  std::string mode = "threads";
  // GPU of rank r (threads; empty: 0..N-1); processes: only rank 0's, the first (empty: device).
  std::vector<int> devices;
  std::string bootstrap = "0.0.0.0:7070";          // processes: where rank 0 serves the bootstrap
  absl::Duration init_timeout = absl::Minutes(2);  // longest wait for every rank to join
  absl::Duration op_timeout = absl::Seconds(60);   // longest one command may take on any rank
  // threads: steps with host activations go straight to every GPU, each from its own thread
  // (TpOptions::direct_host_steps); false: through the NCCL rank protocol like mode B.
  bool direct_host_steps = true;
};

struct BackendChoice {
  std::string name = "auto";  // "auto", "cpu" or "cuda"
  int device = 0;             // GPU index for cuda
  // cuda prefill: "exact" (fp32, matches the fp64 oracle to ~1e-6) or "tensor_core" (bf16 UT
  // form on tensor cores, ~1e-2).
  std::string cuda_prefill = "exact";
  TensorParallelChoice tp;
};

// Creates the backend `choice` names: "cpu"; "cuda" (FAILED_PRECONDITION when this build has no
// CUDA or the GPU is not visible); "auto" = cuda when built with it and a GPU is visible, else cpu.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const BackendChoice& choice);

// Whether this binary was built with the CUDA backend.
bool BuiltWithCuda();

// Whether this binary can run tensor-parallel groups over GPUs (CUDA and NCCL).
bool BuiltWithNccl();

// The engine's backend and what has to outlive it.
struct ServingBackend {
  std::unique_ptr<Backend> backend;
  int32_t tensor_parallel_size = 1;
  // Rank 0's bootstrap server (mode processes); release it only after the engine is gone.
  std::shared_ptr<void> keep_alive;
  std::string layout;  // how the ranks are laid out, for the startup log
};

// Creates the backend `choice` names for an engine of `engine`; with choice.tp.size > 1 the
// tensor-parallel group, which calls `on_broken` (may be empty) once if it breaks. Mode processes
// returns once every rank has joined. FAILED_PRECONDITION when this build has no NCCL or the GPUs
// are not visible; INVALID_ARGUMENT for settings that cannot work.
absl::StatusOr<ServingBackend> MakeServingBackend(
    const BackendChoice& choice, const EngineOptions& engine,
    std::function<void(const absl::Status&)> on_broken = nullptr);

// Carries a tensor-parallel group's breaking (reported from any thread, possibly before the
// server exists) to a sink attached later, such as the server's health.
class BrokenGroupRelay {
 public:
  // Passes `why` to the sink, or keeps it for Attach; only the first report counts.
  void Report(const absl::Status& why);
  // Sets the sink (nullptr detaches it) and passes it a report kept so far.
  void Attach(std::function<void(const absl::Status&)> sink);
  // The first report; OK while there was none.
  absl::Status status() const;

 private:
  mutable absl::Mutex mu_;
  std::function<void(const absl::Status&)> sink_ ABSL_GUARDED_BY(mu_);
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
  bool delivered_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvbuffer::server
