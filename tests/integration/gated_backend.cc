#include "tests/integration/gated_backend.h"

#include <utility>

namespace kvbuffer::testing {

GatedBackend::GatedBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}

void GatedBackend::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

void GatedBackend::Open() {
  absl::MutexLock lock(&mu_);
  closed_ = false;
}

bool GatedBackend::WaitForHeld(int n, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return held_ >= n; };
  return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
}

void GatedBackend::FailNextStep(absl::Status status) {
  absl::MutexLock lock(&mu_);
  fail_next_ = std::move(status);
}

int GatedBackend::steps_run() {
  absl::MutexLock lock(&mu_);
  return run_;
}

absl::Status GatedBackend::RunLayerStep(const LayerStep& step) {
  {
    absl::MutexLock lock(&mu_);
    if (!fail_next_.ok()) {
      absl::Status s = std::move(fail_next_);
      fail_next_ = absl::OkStatus();
      return s;
    }
    ++held_;
    auto open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !closed_; };
    mu_.Await(absl::Condition(&open));
    --held_;
  }
  absl::Status s = inner_->RunLayerStep(step);
  absl::MutexLock lock(&mu_);
  ++run_;
  return s;
}

}  // namespace kvbuffer::testing
