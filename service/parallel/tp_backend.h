// TpBackend: the Backend of rank 0 of a tensor-parallel group. The engine drives it like any
// backend; each call becomes one command of the protocol (tp_protocol.h): the activations are
// moved once into transport memory, sliced per head shard there and scattered to the ranks,
// every rank runs its shard, and the outputs come back to rank 0 in head order. Rank 0
// computes shard 0 itself. The other ranks run RunTpWorker: on threads owned by this backend
// (MakeInProcessTpBackend: one process driving N GPUs) or in other processes (one per GPU).
//
// Failures: a round that misses options.op_timeout, a transport error, or ranks that disagree
// (some applied a call, some did not) break the group for good: the transport is aborted, every
// later call returns the breaking status (UNAVAILABLE or INTERNAL), Health() says so and
// options.on_broken is called once. An idle group sends heartbeats so a dead rank is noticed.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"
#include "service/parallel/head_shard.h"
#include "service/parallel/host_buffer.h"
#include "service/parallel/host_step_fanout.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/tp_buffers.h"
#include "service/parallel/tp_options.h"
#include "service/parallel/tp_protocol.h"
#include "service/parallel/tp_rank.h"
#include "service/parallel/tp_transport.h"
#include "service/parallel/tp_worker.h"

namespace kvbuffer::parallel {

class TpBackend : public Backend {
 public:
  // Rank 0 over `transport` (rank 0 of its group) and `compute` (shard 0); the other ranks run
  // elsewhere. Starts the heartbeat thread.
  static absl::StatusOr<std::unique_ptr<TpBackend>> Create(std::unique_ptr<TpTransport> transport,
                                                           std::unique_ptr<ShardCompute> compute,
                                                           TpOptions options);
  // Tells the workers to stop (when the group is healthy), stops the heartbeat and joins any
  // in-process worker threads.
  ~TpBackend() override;

  // Returns shard 0's backend name with the group size, e.g. "cuda-tp2".
  std::string Name() const override;

  // Checks that the group size divides H, sends each rank its parameter slice and allocates
  // every shard with the same pool sizes.
  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override;

  // Runs the step on every rank and gathers the outputs in head order.
  absl::Status RunLayerStep(const LayerStep& step) override;

  // Folds on every rank.
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override;

  // Commits conv windows on every rank.
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override;

  // Zeroes conv windows on every rank.
  absl::Status ResetConv(std::span<const int32_t> conv_slots) override;

  // Gathers one layer of a state slot from every rank into out [HV][K][V].
  absl::Status ReadState(int32_t state_slot, int32_t layer, float* out) override;

  // Every rank's memory as of its last reply (every command and heartbeat refreshes it); never
  // waits for a command in flight.
  BackendMemory Memory() const override;

  // Host memory of the transport (page-locked under NCCL): steps transfer activations out of it
  // and gather outputs into it without a bounce copy.
  void* AllocateHostBuffer(size_t bytes) override;

  // Frees memory from AllocateHostBuffer.
  void FreeHostBuffer(void* p) override;

  // True for the protocol path: the activations go to rank 0's device in one transfer from the
  // engine's staging and are sliced per rank there. False with direct host steps: each rank
  // reads its slice from the caller's memory itself.
  bool PrefersHostBufferInputs() const override { return direct_ == nullptr; }

  // True with direct host steps: each rank checks its slice's values while it copies them.
  bool ChecksActivationValues() const override { return direct_ != nullptr; }

  // OK while the group works; the status that broke it afterwards. Never waits for a command in
  // flight (health checks stay responsive while a rank hangs).
  absl::Status Health() const;

  // Where the host time of direct host steps went (all zero without them).
  HostStepFanoutStats DirectStepStats() const {
    return direct_ != nullptr ? direct_->fanout.Stats() : HostStepFanoutStats{};
  }

  // Sends a heartbeat now (also what the heartbeat thread does); the group's health after it.
  absl::Status Ping();

  // Group size.
  int32_t world_size() const { return world_; }

 private:
  friend absl::StatusOr<std::unique_ptr<TpBackend>> MakeInProcessTpBackend(
      std::vector<std::unique_ptr<TpTransport>>, std::vector<std::unique_ptr<ShardCompute>>,
      TpOptions);

  // A rank > 0 run on a thread of this process.
  struct InProcessWorker {
    std::unique_ptr<TpTransport> transport;
    std::unique_ptr<ShardCompute> compute;
    std::unique_ptr<absl::Mutex> compute_mu;  // held by whoever drives `compute`
    std::unique_ptr<TpDoorbell> doorbell;     // rings before each command (direct host steps)
    std::thread thread;
    absl::Status result;
  };

  // Direct host steps of an in-process group (TpOptions::direct_host_steps): every rank's
  // backend driven from threads of rank 0, with the worker's lock held.
  struct DirectSteps {
    DirectSteps(int32_t world, int32_t copy_threads, HostAllocator scratch, absl::Duration spin)
        : fanout(world, copy_threads, /*concurrent=*/true, scratch, spin) {}
    HostStepFanout fanout;
    std::vector<Backend*> backends;
    std::vector<absl::Mutex*> locks;
  };

  // RunLayerStep through DirectSteps.
  absl::Status RunDirectStep(const LayerStep& step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  TpBackend(std::unique_ptr<TpTransport> transport, std::unique_ptr<ShardCompute> compute,
            TpOptions options);

  // Writes the metadata into `dst` (h.meta_bytes bytes).
  using MetaWriter = absl::FunctionRef<void(void* dst)>;
  // Enqueues the transfers that fill rank r's inputs at `dst` (transport memory, h.input_bytes
  // bytes).
  using InputWriter = absl::FunctionRef<absl::Status(int32_t r, void* dst)>;
  // Runs shard 0's part with its inputs and output payload in transport memory.
  using LocalRunner = absl::FunctionRef<absl::Status(const void* inputs, void* payload)>;
  // Enqueues the copies of the gathered payloads out of the gather buffer (slot bytes per rank).
  using OutputReader = absl::FunctionRef<absl::Status(const uint8_t* gather, size_t slot)>;

  // Runs one command on every rank (rounds A-C), combining the ranks' statuses.
  absl::Status Command(CommandHeader& h, MetaWriter write_meta, InputWriter write_inputs,
                       LocalRunner run_local, OutputReader read_outputs)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A command with no metadata, inputs or outputs (heartbeat, shutdown).
  absl::Status Bare(TpOp op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The block size to announce in `h` for the next command: after a step, large enough for the
  // inputs of the recent steps to go inline (up to max_block_bytes); else command_bytes.
  size_t NextBlockBytes(const CommandHeader& h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Break(const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckUsable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HeartbeatLoop();
  void StartHeartbeat();
  // True if [p, p + bytes) lies in one buffer from AllocateHostBuffer.
  bool IsHostBuffer(const void* p, size_t bytes) const;

  const TpOptions options_;
  const int32_t world_;
  mutable absl::Mutex mu_;
  std::unique_ptr<TpTransport> transport_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<ShardCompute> compute_ ABSL_GUARDED_BY(mu_);
  RankExecutor exec_ ABSL_GUARDED_BY(mu_);
  absl::Status health_ ABSL_GUARDED_BY(mu_);
  bool allocated_ ABSL_GUARDED_BY(mu_) = false;
  ModelConfig config_ ABSL_GUARDED_BY(mu_);
  std::vector<HeadShard> shards_ ABSL_GUARDED_BY(mu_);
  ModelConfig shard_config_ ABSL_GUARDED_BY(mu_);
  uint64_t sequence_ ABSL_GUARDED_BY(mu_) = 0;
  size_t block_bytes_ ABSL_GUARDED_BY(mu_);  // the next command's block (round A broadcast)
  std::array<size_t, 4> recent_needs_ ABSL_GUARDED_BY(mu_) = {};  // block bytes of recent steps
  size_t recent_next_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_command_ ABSL_GUARDED_BY(mu_);
  // What Health() and Memory() read without waiting for mu_.
  mutable absl::Mutex stats_mu_ ABSL_ACQUIRED_AFTER(mu_);
  absl::Status published_health_ ABSL_GUARDED_BY(stats_mu_);
  std::vector<BackendMemory> rank_memory_ ABSL_GUARDED_BY(stats_mu_);
  std::vector<absl::Status> statuses_ ABSL_GUARDED_BY(mu_);
  // Transport memory and its host staging, grown between commands. raw_dev_ holds a step's
  // activations as the engine sent them, before they are sliced per rank into in_dev_ or the
  // command block.
  TransportBuffer block_dev_, meta_dev_, in_dev_, gather_dev_, raw_dev_;
  TransportBuffer block_host_{true}, meta_host_{true}, in_host_{true}, status_host_{true},
      out_host_{true};
  // Buffers handed out by AllocateHostBuffer.
  mutable absl::Mutex host_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::vector<std::pair<const uint8_t*, size_t>> host_buffers_ ABSL_GUARDED_BY(host_mu_);
  // Heartbeat thread.
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread heartbeat_;
  std::vector<InProcessWorker> workers_;
  std::unique_ptr<DirectSteps> direct_;  // set once, before the engine sees this backend
  std::string name_;
};

// Mode A, one process driving every rank: transports[r] and computes[r] are rank r's. Ranks > 0
// run RunTpWorker on threads owned by the returned backend (rank 0).
absl::StatusOr<std::unique_ptr<TpBackend>> MakeInProcessTpBackend(
    std::vector<std::unique_ptr<TpTransport>> transports,
    std::vector<std::unique_ptr<ShardCompute>> computes, TpOptions options);

}  // namespace kvbuffer::parallel
