#include "service/parallel/shard_runner.h"

namespace kvbuffer::parallel {

ShardRunner::ShardRunner(int32_t num_shards, bool concurrent) : num_shards_(num_shards) {
  if (!concurrent) return;
  workers_.reserve(num_shards > 1 ? num_shards - 1 : 0);
  for (int32_t s = 1; s < num_shards; ++s) workers_.emplace_back([this, s] { WorkerLoop(s); });
}

ShardRunner::~ShardRunner() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

void ShardRunner::Run(absl::FunctionRef<void(int32_t)> fn) {
  if (workers_.empty()) {
    for (int32_t s = 0; s < num_shards_; ++s) fn(s);
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    task_ = &fn;
    pending_ = static_cast<int32_t>(workers_.size());
    ++generation_;
  }
  fn(0);
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int32_t* pending) { return *pending == 0; }, &pending_));
  task_ = nullptr;
}

void ShardRunner::WorkerLoop(int32_t shard) {
  uint64_t seen = 0;
  while (true) {
    const absl::FunctionRef<void(int32_t)>* task = nullptr;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_ || generation_ != seen; };
      mu_.Await(absl::Condition(&ready));
      if (stop_) return;
      seen = generation_;
      task = task_;
    }
    (*task)(shard);
    absl::MutexLock lock(&mu_);
    --pending_;
  }
}

}  // namespace kvbuffer::parallel
