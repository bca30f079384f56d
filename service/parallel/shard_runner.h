// Runs one function per shard, either all on the calling thread or concurrently on one thread per
// shard (shard 0 on the caller), and returns when every shard is done. Threads are started once;
// a call allocates nothing.
#pragma once

#include <cstdint>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

namespace kvbuffer::parallel {

class ShardRunner {
 public:
  // Prepares to run `num_shards` shards; `concurrent` starts num_shards - 1 worker threads.
  ShardRunner(int32_t num_shards, bool concurrent);
  // Stops and joins the worker threads.
  ~ShardRunner();

  ShardRunner(const ShardRunner&) = delete;
  ShardRunner& operator=(const ShardRunner&) = delete;

  // Runs fn(s) for s in [0, num_shards) and returns when all have returned. Not reentrant: one
  // Run at a time (callers serialise).
  void Run(absl::FunctionRef<void(int32_t)> fn);

  // Number of shards.
  int32_t num_shards() const { return num_shards_; }

 private:
  void WorkerLoop(int32_t shard);

  const int32_t num_shards_;
  absl::Mutex mu_;
  const absl::FunctionRef<void(int32_t)>* task_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvbuffer::parallel
