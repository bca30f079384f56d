// Buffered decode / verify of one sequence on one layer against checkpoint + buffer (DESIGN §2).
#pragma once

#include <cstdint>

#include "kernels/reference/model_config.h"
#include "kernels/reference/token_prep.h"

namespace kvbuffer {

// Rows of one (sequence, layer) buffer, contiguous, fp32: k [n][H][K], u [n][HV][V], G [n][HV]
// with G_j the sum of g since the checkpoint.
struct BufferRows {
  const float* k = nullptr;
  const float* u = nullptr;
  const float* G = nullptr;
  int32_t n = 0;
};

// Computes outputs and new buffer rows for m tokens following the checkpoint S ([HV][K][V], or
// nullptr when the sequence has no state) and the buffer. m == 1 is a decode step; m > 1 is a
// verify of m drafts solved by forward substitution (also exact for committed multi-token
// appends). Writes out [m][HV][V], new_u [m][HV][V] and new_G [m][HV] (relative to the
// checkpoint); the new rows' k^ are tok.k.
void BufferedStep(const ModelConfig& config, const float* S, const BufferRows& buffer,
                  const PreparedTokens& tok, float* out, float* new_u, float* new_G);

}  // namespace kvbuffer
