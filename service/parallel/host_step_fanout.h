// HostStepFanout: one per-layer step with host activations run on N head shards at once, each
// shard doing its own host work on its own threads: it copies its slice of the activations into
// its scratch (checking the values in the same pass, when asked) on `lanes` threads, runs the step
// on its backend, and lands its outputs in its heads of the full output (straight from the device
// when the backend takes an output row stride). So the host bytes of a step are split N ways as
// the device work is; nothing is copied twice. Used by ShardedBackend and by an in-process
// TpBackend (one process driving N GPUs).
#pragma once

#include <atomic>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"
#include "service/parallel/head_shard.h"
#include "service/parallel/host_buffer.h"
#include "service/parallel/shard_runner.h"

namespace kvbuffer::parallel {

// What the host time of a fanout's steps went to, summed since it was created (milliseconds).
struct HostStepFanoutStats {
  int64_t steps = 0;
  double prepare_ms = 0;  // from entry until every lane has copied and checked its rows
  double total_ms = 0;    // from entry until every shard's step returned
};

// Copy threads per shard when a caller asks for 0. One: on the 2x H200 host of bench/RESULTS.md
// copying did not get faster with more threads per rank (4 per rank: B = 256 slightly faster,
// B = 64 much slower; 8 per rank: both much slower).
inline constexpr int32_t kDefaultFanoutLanes = 1;

class HostStepFanout {
 public:
  // num_shards shards with `lanes` copy threads each (0: kDefaultFanoutLanes); `concurrent` runs
  // them on threads of its own (else everything on the caller, one lane per shard), which spin for
  // `spin` after a step before they sleep. Scratch comes from `scratch_allocator` (page-locked
  // memory for GPU shards makes their copies direct).
  HostStepFanout(int32_t num_shards, int32_t lanes, bool concurrent,
                 HostAllocator scratch_allocator, absl::Duration spin = absl::Microseconds(200));

  // The model and the heads each shard owns; call before Run.
  void SetShards(const ModelConfig& config, std::vector<HeadShard> shards);

  // Runs `step` (host pointers, the full model's layouts) on backends[s] for every shard s;
  // locks[s], when given and not null, is held while shard s uses its backend. When
  // `check_values`, activation values outside the rule of activation_check.h are refused with the
  // engine's INVALID_ARGUMENT message before any shard runs. Returns non-OK when the step was
  // refused before any shard ran (then nothing changed anywhere); else OK, and statuses() holds
  // each shard's own result (the caller decides what disagreement means).
  absl::Status Run(const LayerStep& step, std::span<Backend* const> backends,
                   std::span<absl::Mutex* const> locks, bool check_values);

  // Each shard's result of the last Run that reached the shards.
  std::span<const absl::Status> statuses() const { return statuses_; }

  // Copy threads per shard.
  int32_t lanes() const { return lanes_; }

  // Where the host time went (never blocks a Run for long).
  HostStepFanoutStats Stats() const;

 private:
  struct Scratch {
    HostBuffer in;   // the shard's qkv | a | b at 256-byte aligned offsets
    HostBuffer out;  // its outputs when its backend takes no row stride
  };

  // Reserves shard s's scratch and fills its step (pointers, output placement).
  absl::Status Reserve(int32_t s, const LayerStep& step, Backend* backend, LayerStep* sub);
  // Copies (and checks) rows [t0, t1) of shard s's inputs into sub's scratch; a refusal.
  absl::Status CopyRows(int32_t s, const LayerStep& step, int64_t t0, int64_t t1, bool check_values,
                        const LayerStep& sub) const;
  // Runs shard s's prepared step and places its outputs.
  absl::Status RunShard(int32_t s, const LayerStep& step, Backend* backend, absl::Mutex* lock,
                        const LayerStep& sub);
  // The engine's message for the first refused value of the full activations.
  absl::Status ValueError(const LayerStep& step) const;

  const int32_t num_shards_;
  const int32_t lanes_;
  ShardRunner runner_;  // num_shards_ * lanes_ slots; lane l serves shard l / lanes_
  ModelConfig config_;
  std::vector<HeadShard> shards_;
  std::vector<Scratch> scratch_;
  std::vector<LayerStep> subs_;
  std::vector<absl::Status> reserved_;  // per shard
  std::vector<absl::Status> copied_;    // per lane
  std::vector<absl::Status> statuses_;  // per shard
  std::atomic<int32_t> arrived_{0};     // lanes past their copy (concurrent runs wait for all)
  mutable absl::Mutex stats_mu_;
  HostStepFanoutStats stats_ ABSL_GUARDED_BY(stats_mu_);
};

}  // namespace kvbuffer::parallel
