// Flush: fold a buffer into its checkpoint state.
#pragma once

#include "kernels/reference/buffered_step.h"
#include "kernels/reference/model_config.h"

namespace kvbuffer {

// S <- e^{G_n} S + sum_j e^{G_n - G_j} k^_j u_j^T per value head ([HV][K][V]); S is read as zero
// when `state_is_zero` (a freshly allocated slot). A buffer of n == 0 leaves S unchanged (zeroed
// if state_is_zero).
void FoldBuffer(const ModelConfig& config, float* S, bool state_is_zero, const BufferRows& buffer);

}  // namespace kvbuffer
