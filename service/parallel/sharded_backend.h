// ShardedBackend: one Backend over N child backends, each serving one head shard (head_shard.h).
// Every call is split: activations are sliced on the host into each shard's layout, each child
// runs its slice, outputs are gathered back in head order. Pools mirror: the engine's slot, page
// and conv ids mean the same on every shard, and each shard holds only its heads, so a shard's
// pools are 1/N of the model's bytes. The per-head math is independent, so N shards compute bit
// for bit what one backend computes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "service/engine/backend.h"
#include "service/parallel/head_shard.h"
#include "service/parallel/host_buffer.h"
#include "service/parallel/host_step_fanout.h"
#include "service/parallel/shard_runner.h"

namespace kvbuffer::parallel {

// Creates the backend of shard `shard` (e.g. a CPU backend, or a CUDA backend on GPU `shard`);
// nullptr when it cannot.
using ShardBackendFactory = std::function<std::unique_ptr<Backend>(int32_t shard)>;

struct ShardedBackendOptions {
  int32_t num_shards = 2;  // N; must divide the model's key heads
  ShardBackendFactory make_shard;
  // Run the shards concurrently, one thread per shard (device children); else one after another.
  bool concurrent = false;
  // Host scratch for the sliced activations and shard outputs (page-locked memory for device
  // children makes their copies direct).
  HostAllocator scratch_allocator = HeapAllocator();
  // Each shard checks the activation values of its slice while it copies them (in parallel when
  // concurrent), instead of the engine scanning them all first (ChecksActivationValues()).
  bool check_values_in_shards = false;
  // Threads that copy each shard's slice of a step's activations when concurrent (0: one).
  int32_t copy_threads = 0;
};

class ShardedBackend : public Backend {
 public:
  // Creates the N child backends (INVALID_ARGUMENT on a bad count or factory, INTERNAL if the
  // factory returns nullptr).
  static absl::StatusOr<std::unique_ptr<ShardedBackend>> Create(ShardedBackendOptions options);
  ~ShardedBackend() override;

  // Returns the children's name with the shard count, e.g. "cuda-tp2".
  std::string Name() const override;

  // Checks that N divides H, then allocates every child with its shard's config, parameters and
  // the same pool sizes.
  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override;

  // Slices the activations per shard, runs every shard and gathers the outputs in head order
  // (HostStepFanout: each shard does its own part of that host work).
  absl::Status RunLayerStep(const LayerStep& step) override;

  // options.check_values_in_shards.
  bool ChecksActivationValues() const override { return options_.check_values_in_shards; }

  // Where the host time of steps went.
  HostStepFanoutStats StepStats() const { return fanout_.Stats(); }

  // Folds the buffers on every shard.
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override;

  // Commits the conv windows on every shard.
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override;

  // Zeroes the conv windows on every shard.
  absl::Status ResetConv(std::span<const int32_t> conv_slots) override;

  // Gathers one layer of a state slot from every shard into out [HV][K][V].
  absl::Status ReadState(int32_t state_slot, int32_t layer, float* out) override;

  // Sums the children's memory (pools and cards).
  BackendMemory Memory() const override;

  // OK while the shards agree; INTERNAL for good once a call failed on some shards and not on
  // others (their pools then differ), and every later call returns that status.
  absl::Status Health() const;

  // Number of shards.
  int32_t num_shards() const { return static_cast<int32_t>(children_.size()); }

  // The backend of shard `s` (tests and per-shard diagnostics).
  Backend* shard_backend(int32_t s) const { return children_[s].get(); }

 private:
  explicit ShardedBackend(ShardedBackendOptions options,
                          std::vector<std::unique_ptr<Backend>> children);

  // Runs fn on every shard and folds the per-shard statuses into one (see Health).
  absl::Status RunAll(absl::FunctionRef<absl::Status(int32_t)> fn);
  // Folds per-shard statuses into one: OK, the common refusal, or the divergence (see Health).
  absl::Status Combine(std::span<const absl::Status> statuses);
  absl::Status CheckUsable() const;

  ShardedBackendOptions options_;
  std::vector<std::unique_ptr<Backend>> children_;
  ShardRunner runner_;
  bool allocated_ = false;
  ModelConfig config_;
  std::vector<HeadShard> shards_;
  std::vector<ModelConfig> shard_configs_;
  HostStepFanout fanout_;
  std::vector<Backend*> child_ptrs_;
  std::vector<absl::Status> statuses_;
  mutable absl::Mutex health_mu_;
  absl::Status health_ ABSL_GUARDED_BY(health_mu_);
};

// Convenience: a ShardedBackend of `num_shards` exact CPU backends run one after another.
absl::StatusOr<std::unique_ptr<ShardedBackend>> MakeShardedCpuBackend(int32_t num_shards);

}  // namespace kvbuffer::parallel
