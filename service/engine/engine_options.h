// Settings of an engine: model, buffering, pools, lifetimes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kernels/reference/dtype.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer {

struct EngineOptions {
  ModelConfig model;
  std::vector<LayerParams> params;  // empty: drawn from model.param_seed

  // Buffering. Before a step of m tokens, a sequence with a state folds its buffer when
  // n + m > flush_interval; a sequence without one when n + m > stateless_limit (allocating its
  // state then). So a sequence never holds more than max(flush_interval, stateless_limit) rows.
  int32_t flush_interval = 16;   // C
  int32_t stateless_limit = 64;  // tokens a sequence may hold with no state at all
  int32_t max_drafts = 16;       // most tokens in one VerifyDrafts item (<= flush_interval)

  // Pools.
  int32_t max_sequences = 256;  // conv slots / open sequences
  int32_t max_sequences_per_tenant = 0;  // open sequences one tenant may hold (0: no quota)
  int32_t state_slots = 64;     // sequences that may hold a state at once
  int32_t buffer_pages = 1024;  // pages of page_tokens rows (all layers)
  int32_t page_tokens = 16;
  DType buffer_dtype = DType::kFloat32;  // k^ and u rows (FP32 or BF16)
  DType conv_dtype = DType::kFloat32;    // raw qkv rows of conv windows (FP32 or BF16)

  // Lifetimes and retries.
  absl::Duration idle_ttl = absl::Minutes(10);  // idle sequences are closed after this
  int32_t replay_max_tokens = 4096;  // outputs of calls up to this many tokens per sequence are
                                     // kept for an exact replay of a retried call
};

// OK if `o` is consistent, else INVALID_ARGUMENT naming the setting and the expected range.
absl::Status ValidateEngineOptions(const EngineOptions& o);

}  // namespace kvbuffer
