#include "service/parallel/shard_runner.h"

#include <chrono>

namespace kvbuffer::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// Spins until done() or `spin` passes; true if done().
template <typename Done>
bool SpinUntil(Done done, absl::Duration spin) {
  const auto until = Clock::now() + absl::ToChronoNanoseconds(spin);
  for (int i = 0;; ++i) {
    if (done()) return true;
    if ((i & 63) == 63) {
      if (Clock::now() > until) return false;
      std::this_thread::yield();
    }
  }
}

}  // namespace

ShardRunner::ShardRunner(int32_t num_shards, bool concurrent, absl::Duration spin)
    : num_shards_(num_shards), spin_(spin) {
  if (!concurrent) return;
  workers_.reserve(num_shards > 1 ? num_shards - 1 : 0);
  for (int32_t s = 1; s < num_shards; ++s) workers_.emplace_back([this, s] { WorkerLoop(s); });
}

ShardRunner::~ShardRunner() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    generation_.fetch_add(1, std::memory_order_release);
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
    pending_.store(static_cast<int32_t>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  fn(0);
  auto done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!SpinUntil(done, spin_)) {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done));
  }
  absl::MutexLock lock(&mu_);  // also orders the workers' last writes before our return
  task_ = nullptr;
}

void ShardRunner::WorkerLoop(int32_t shard) {
  uint64_t seen = 0;
  while (true) {
    auto ready = [this, &seen] { return generation_.load(std::memory_order_acquire) != seen; };
    const absl::FunctionRef<void(int32_t)>* task = nullptr;
    SpinUntil(ready, spin_);
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(&ready));
      if (stop_) return;
      seen = generation_.load(std::memory_order_relaxed);
      task = task_;
    }
    (*task)(shard);
    absl::MutexLock lock(&mu_);
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace kvbuffer::parallel
