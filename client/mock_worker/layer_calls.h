// Per-layer calls (Prefill, DecodeStep, VerifyDrafts) of a batch of checked sequences: seeded
// random activations written into the request, and the answer checked against every sequence's
// oracle. Shared by the mock worker and the integration tests.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "client/mock_worker/activation_source.h"
#include "client/mock_worker/checked_sequence.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::mock {

enum class LayerKind { kPrefill, kDecode, kVerify };

// "Prefill", "DecodeStep" or "VerifyDrafts".
const char* LayerKindName(LayerKind kind);

class LayerCalls {
 public:
  // Activations drawn from `seed` in `input_dtype`; outputs requested in `output_dtype`.
  LayerCalls(const ModelConfig& config, DType input_dtype, DType output_dtype, uint64_t seed);

  // Draws activations for tokens[i] tokens of seqs[i] on `layer`, keeps them for Check, and
  // writes layer, sequences (with their oracle positions), qkv, a, b and output_dtype.
  // Request is PrefillRequest, DecodeStepRequest or VerifyDraftsRequest.
  template <typename Request>
  void Fill(int32_t layer, absl::Span<CheckedSequence* const> seqs,
            absl::Span<const int32_t> tokens, Request* request);

  // Checks the answer to the call last filled on `layer`: dtype, shape and positions (an error
  // naming what is wrong), then each sequence's outputs against its oracle, which advances
  // (committed kinds) or whose draft copy advances (kVerify). errors[i] receives sequence i's
  // relative error.
  absl::Status Check(LayerKind kind, int32_t layer, absl::Span<CheckedSequence* const> seqs,
                     absl::Span<const int32_t> tokens, const v1::LayerOutput& output,
                     std::vector<double>* errors);

  ActivationSource& rng() { return rng_; }
  const ModelConfig& config() const { return config_; }

 private:
  ModelConfig config_;
  DType input_dtype_;
  DType output_dtype_;
  ActivationSource rng_;
  std::vector<std::vector<Activations>> acts_;  // [layer][sequence] of the last call per layer
  std::vector<float> qkv_, a_, b_, got_;
};

}  // namespace kvbuffer::mock
