#include "client/mock_worker/checked_sequence.h"

#include <utility>

namespace kvbuffer::mock {

CheckedSequence::CheckedSequence(uint64_t id, const ModelConfig& config,
                                 const std::vector<LayerParams>* params)
    : id_(id), oracle_(config, params), draft_acts_(config.num_layers) {}

double CheckedSequence::CheckCommitted(int32_t layer, const Activations& acts, const float* got) {
  std::vector<double> want =
      oracle_.Append(layer, acts.qkv.data(), acts.a.data(), acts.b.data(), acts.tokens);
  return RelativeError(got, want.data(), want.size());
}

double CheckedSequence::CheckDrafts(int32_t layer, const Activations& acts, const float* got) {
  if (!draft_oracle_) draft_oracle_.emplace(oracle_);
  drafts_ = acts.tokens;
  draft_acts_[layer] = acts;
  std::vector<double> want =
      draft_oracle_->Append(layer, acts.qkv.data(), acts.a.data(), acts.b.data(), acts.tokens);
  return RelativeError(got, want.data(), want.size());
}

void CheckedSequence::CommitDrafts(int32_t accepted) {
  bool all = true;
  for (const std::optional<Activations>& a : draft_acts_) {
    if (!a || a->tokens != accepted) all = false;
  }
  if (all && draft_oracle_) {
    oracle_ = std::move(*draft_oracle_);
  } else {
    for (size_t layer = 0; layer < draft_acts_.size(); ++layer) {
      const std::optional<Activations>& a = draft_acts_[layer];
      if (!a || accepted == 0) continue;
      oracle_.Append(static_cast<int32_t>(layer), a->qkv.data(), a->a.data(), a->b.data(),
                     accepted);
    }
  }
  draft_oracle_.reset();
  for (std::optional<Activations>& a : draft_acts_) a.reset();
  drafts_ = 0;
}

}  // namespace kvbuffer::mock
