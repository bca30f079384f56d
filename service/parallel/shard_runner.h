// Runs one function per shard, either all on the calling thread or concurrently on one thread per
// shard (shard 0 on the caller), and returns when every shard is done. Threads are started once;
// a call allocates nothing. Concurrent runs hand work over by spinning briefly before sleeping, so
// that back-to-back steps do not pay a thread wake-up each.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvbuffer::parallel {

class ShardRunner {
 public:
  // Prepares to run `num_shards` shards; `concurrent` starts num_shards - 1 worker threads, which
  // spin for `spin` after each run (waiting for the next one) before they sleep.
  ShardRunner(int32_t num_shards, bool concurrent, absl::Duration spin = absl::Microseconds(200));
  // Stops and joins the worker threads.
  ~ShardRunner();

  ShardRunner(const ShardRunner&) = delete;
  ShardRunner& operator=(const ShardRunner&) = delete;

  // Runs fn(s) for s in [0, num_shards) and returns when all have returned. Not reentrant: one
  // Run at a time (callers serialise).
  void Run(absl::FunctionRef<void(int32_t)> fn);

  // Number of shards.
  int32_t num_shards() const { return num_shards_; }

  // True if the shards of one Run execute at the same time on different threads (then they may
  // wait for each other inside fn).
  bool concurrent() const { return !workers_.empty(); }

 private:
  void WorkerLoop(int32_t shard);

  const int32_t num_shards_;
  const absl::Duration spin_;
  absl::Mutex mu_;
  const absl::FunctionRef<void(int32_t)>* task_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Written under mu_, also read without it by spinning threads.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int32_t> pending_{0};
  std::vector<std::thread> workers_;
};

}  // namespace kvbuffer::parallel
