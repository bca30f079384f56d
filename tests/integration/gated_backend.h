// A Backend for fault injection in tests: it forwards to a real backend (the CPU one), and can
// hold per-layer steps at a gate until the test opens it (to have a call running while a client
// gives up, cancels or is killed) or fail the next step with a chosen status before it touches
// anything (a device failure).
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"

namespace kvbuffer::testing {

class GatedBackend final : public Backend {
 public:
  // Forwards to `inner`.
  explicit GatedBackend(std::unique_ptr<Backend> inner);

  // From now on RunLayerStep waits at the gate (before running) until Open.
  void Close();
  // Lets every waiting and later step through.
  void Open();
  // Waits up to `timeout` until `n` steps wait at the gate; whether they do.
  bool WaitForHeld(int n, absl::Duration timeout);
  // The next RunLayerStep returns `status` without running (nothing is written).
  void FailNextStep(absl::Status status);
  // Steps run to completion so far.
  int steps_run();

  std::string Name() const override { return inner_->Name(); }
  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override {
    return inner_->Allocate(config, params, sizes);
  }
  absl::Status RunLayerStep(const LayerStep& step) override;
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override {
    return inner_->FoldBuffers(layer, items, page_table);
  }
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override {
    return inner_->CommitConv(layer, items);
  }
  absl::Status ResetConv(std::span<const int32_t> conv_slots) override {
    return inner_->ResetConv(conv_slots);
  }
  absl::Status ReadState(int32_t state_slot, int32_t layer, float* out) override {
    return inner_->ReadState(state_slot, layer, out);
  }
  BackendMemory Memory() const override { return inner_->Memory(); }

 private:
  std::unique_ptr<Backend> inner_;
  absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int held_ ABSL_GUARDED_BY(mu_) = 0;
  int run_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status fail_next_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvbuffer::testing
