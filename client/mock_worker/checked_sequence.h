// A sequence as the mock worker plays it: its id, its fp64 oracle (the truth every answer is
// checked against), and the tentative state of a draft window being verified.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "client/mock_worker/activation_source.h"
#include "kernels/reference/gdn_oracle.h"

namespace kvbuffer::mock {

class CheckedSequence {
 public:
  // A fresh sequence (position 0 on every layer) of `config` with `params` (which must outlive it).
  CheckedSequence(uint64_t id, const ModelConfig& config, const std::vector<LayerParams>* params);

  uint64_t id() const { return id_; }
  // Committed tokens on `layer`.
  int64_t position(int32_t layer) const { return oracle_.position(layer); }

  // Appends committed tokens `acts` on `layer` to the oracle and returns the relative error of
  // `got` ([T][HV][V] floats) against the oracle's outputs.
  double CheckCommitted(int32_t layer, const Activations& acts, const float* got);

  // Evaluates draft tokens `acts` on `layer` on a copy of the oracle (taken at the first draft
  // layer of a window), keeps them for the commit, and returns the relative error of `got`.
  double CheckDrafts(int32_t layer, const Activations& acts, const float* got);

  // Drafts pending in the current window (0 when none).
  int32_t pending_drafts() const { return drafts_; }

  // Ends the window: appends the first `accepted` drafts of every layer that verified to the
  // oracle (reusing the copy when all were accepted on every layer).
  void CommitDrafts(int32_t accepted);

  // Raw bookkeeping for the worker's lifetime policy.
  int32_t steps_done = 0;
  int32_t lifetime_steps = 0;

 private:
  uint64_t id_;
  OracleSequence oracle_;
  std::optional<OracleSequence> draft_oracle_;
  std::vector<std::optional<Activations>> draft_acts_;  // per layer, this window
  int32_t drafts_ = 0;
};

}  // namespace kvbuffer::mock
