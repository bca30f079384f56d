// A fixed pool of threads that runs engine work, so that no engine call runs on a gRPC thread.
#pragma once

#include <cstdint>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace kvbuffer::server {

class Executor {
 public:
  // Starts `threads` (>= 1) worker threads.
  explicit Executor(int threads);
  // Runs everything already scheduled, then joins the threads.
  ~Executor();

  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `task` to run on a worker thread (FIFO across the pool).
  void Schedule(absl::AnyInvocable<void() &&> task);

  // Tasks queued and not yet started.
  int64_t queued();

  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvbuffer::server
