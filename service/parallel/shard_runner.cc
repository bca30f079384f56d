#include "service/parallel/shard_runner.h"

#include <chrono>

namespace kvbuffer::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// How long a thread spins for a hand-over before it sleeps on the mutex: about a few steps'
// host work, so that steps in a row never sleep, while an idle runner stops burning a core soon.
constexpr auto kSpin = std::chrono::microseconds(200);

// Spins until done() or kSpin passes; true if done().
template <typename Done>
bool SpinUntil(Done done) {
  const auto until = Clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (done()) return true;
    if ((i & 63) == 63) {
      if (Clock::now() > until) return false;
      std::this_thread::yield();
    }
  }
}

}  // namespace

ShardRunner::ShardRunner(int32_t num_shards, bool concurrent) : num_shards_(num_shards) {
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
  if (!SpinUntil(done)) {
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
    SpinUntil(ready);
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
