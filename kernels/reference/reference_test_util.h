// Test helpers of the reference kernels: random activations and a one-layer sequence driven by
// the fp32 kernels the way a backend drives them (state + buffer rows + conv window).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/reference/buffer_fold.h"
#include "kernels/reference/buffered_step.h"
#include "kernels/reference/chunked_prefill.h"
#include "kernels/reference/gdn_oracle.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"
#include "kernels/reference/token_prep.h"

namespace kvbuffer::testing {

// Raw inputs of T tokens of one layer: qkv [T][channels], a and b [T][HV].
struct Activations {
  int32_t num_tokens = 0;
  std::vector<float> qkv, a, b;
  // Pointers to token t's rows.
  const float* qkv_at(const ModelConfig& c, int32_t t) const {
    return qkv.data() + static_cast<size_t>(t) * c.channels();
  }
  const float* a_at(const ModelConfig& c, int32_t t) const {
    return a.data() + static_cast<size_t>(t) * c.num_v_heads;
  }
  const float* b_at(const ModelConfig& c, int32_t t) const {
    return b.data() + static_cast<size_t>(t) * c.num_v_heads;
  }
};

// Draws T tokens of N(0,1) activations (never all zeros).
inline Activations RandomActivations(const ModelConfig& c, int32_t T, std::mt19937& rng) {
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Activations act;
  act.num_tokens = T;
  act.qkv.resize(static_cast<size_t>(T) * c.channels());
  act.a.resize(static_cast<size_t>(T) * c.num_v_heads);
  act.b.resize(static_cast<size_t>(T) * c.num_v_heads);
  for (auto& x : act.qkv) x = n01(rng);
  for (auto& x : act.a) x = n01(rng);
  for (auto& x : act.b) x = n01(rng);
  return act;
}

// One sequence on one layer, held as the service holds it: optional fp32 checkpoint state, fp32
// buffer rows (k^, u, G) since the checkpoint, and the raw conv window.
class KernelSequence {
 public:
  KernelSequence(const ModelConfig& c, const LayerParams& p)
      : c_(c), p_(p), window_(static_cast<size_t>(c.conv_width - 1) * c.channels(), 0.0f) {}

  // Appends m committed tokens (rows [t0, t0+m) of act) through BufferedStep; returns outputs.
  std::vector<float> Step(const Activations& act, int32_t t0, int32_t m) {
    std::vector<float> out = Evaluate(act, t0, m, /*commit=*/true);
    return out;
  }

  // Outputs of m tentative tokens without changing the sequence.
  std::vector<float> Verify(const Activations& act, int32_t t0, int32_t m) {
    return Evaluate(act, t0, m, /*commit=*/false);
  }

  // Folds the buffer into the state (allocating a zero state on the first fold).
  void Fold() {
    if (!has_state_) S_.assign(static_cast<size_t>(c_.state_elems()), 0.0f);
    FoldBuffer(c_, S_.data(), !has_state_, Rows());
    has_state_ = true;
    k_.clear();
    u_.clear();
    G_.clear();
    n_ = 0;
  }

  // Folds the buffer, then prefills T tokens through ChunkedPrefill, folding the first
  // fold_tokens and keeping the rest as buffer rows; returns outputs.
  std::vector<float> Prefill(const Activations& act, int32_t t0, int32_t T, int32_t fold_tokens) {
    Fold();
    PreparedTokens tok;
    PrepareTokens(c_, p_, window_.data(), act.qkv_at(c_, t0), act.a_at(c_, t0), act.b_at(c_, t0), T,
                  &tok);
    std::vector<float> out(static_cast<size_t>(T) * c_.out_elems());
    std::vector<float> u(out.size());
    std::vector<float> tail_G(static_cast<size_t>(T - fold_tokens) * c_.num_v_heads);
    ChunkedPrefill(c_, S_.data(), false, tok, fold_tokens, out.data(), u.data(), tail_G.data());
    const size_t hk = static_cast<size_t>(c_.num_k_heads) * c_.head_k_dim;
    const size_t hv = static_cast<size_t>(c_.out_elems());
    k_.assign(tok.k.begin() + fold_tokens * hk, tok.k.end());
    u_.assign(u.begin() + fold_tokens * hv, u.end());
    G_ = tail_G;
    n_ = T - fold_tokens;
    AdvanceConvWindow(c_, window_.data(), act.qkv_at(c_, t0), T);
    return out;
  }

  int32_t buffer_rows() const { return n_; }
  bool has_state() const { return has_state_; }
  const std::vector<float>& state() const { return S_; }

 private:
  BufferRows Rows() const { return BufferRows{k_.data(), u_.data(), G_.data(), n_}; }

  std::vector<float> Evaluate(const Activations& act, int32_t t0, int32_t m, bool commit) {
    PreparedTokens tok;
    PrepareTokens(c_, p_, window_.data(), act.qkv_at(c_, t0), act.a_at(c_, t0), act.b_at(c_, t0), m,
                  &tok);
    std::vector<float> out(static_cast<size_t>(m) * c_.out_elems());
    std::vector<float> nu(out.size());
    std::vector<float> nG(static_cast<size_t>(m) * c_.num_v_heads);
    BufferedStep(c_, has_state_ ? S_.data() : nullptr, Rows(), tok, out.data(), nu.data(),
                 nG.data());
    if (commit) {
      k_.insert(k_.end(), tok.k.begin(), tok.k.end());
      u_.insert(u_.end(), nu.begin(), nu.end());
      G_.insert(G_.end(), nG.begin(), nG.end());
      n_ += m;
      AdvanceConvWindow(c_, window_.data(), act.qkv_at(c_, t0), m);
    }
    return out;
  }

  ModelConfig c_;
  const LayerParams& p_;
  bool has_state_ = false;
  std::vector<float> S_;
  std::vector<float> k_, u_, G_;
  int32_t n_ = 0;
  std::vector<float> window_;
};

// Config of a named preset (aborts the test binary on a bad name).
inline ModelConfig Preset(const char* name) {
  ModelConfig c;
  if (!ModelPreset(name, &c)) std::abort();
  return c;
}

// Relative error of got against want (sizes must match; a mismatch counts as +inf); keeps the
// largest value seen in *worst.
inline double RelErr(const std::vector<float>& got, const std::vector<double>& want,
                     double* worst) {
  const double e =
      got.size() == want.size() ? RelativeError(got.data(), want.data(), got.size()) : 1e300;
  if (e > *worst) *worst = e;
  return e;
}

}  // namespace kvbuffer::testing
