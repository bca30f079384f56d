// Chunked prefill in the UT/WY form (chunk 64) from a materialised state.
#pragma once

#include <cstdint>

#include "kernels/reference/model_config.h"
#include "kernels/reference/token_prep.h"

namespace kvbuffer {

// Chunk size of the UT form.
inline constexpr int32_t kPrefillChunk = 64;

// Processes tok.num_tokens tokens starting from state S ([HV][K][V], read as zero when
// `state_is_zero`). Writes out [T][HV][V] and the rows u [T][HV][V] (= V_new, exactly the u_j of
// the recurrence). On return S is the state after the first `fold_tokens` tokens, and tail_G
// [(T - fold_tokens)][HV] holds the cumulative gates of the remaining tokens relative to that
// point, so tokens fold_tokens..T-1 can stay in the buffer as rows (k^ = tok.k, u, tail_G).
void ChunkedPrefill(const ModelConfig& config, float* S, bool state_is_zero,
                    const PreparedTokens& tok, int32_t fold_tokens, float* out, float* u,
                    float* tail_G);

}  // namespace kvbuffer
