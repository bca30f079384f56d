// Internal launchers of the buffered step (chosen by LaunchBufferedStep).
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/buffered_step.h"

namespace kvbuffer::cuda {

// True if the shared-memory tile kernel can run these arguments (V <= 128, 16-byte aligned rows,
// state tile plus scratch within the shared-memory budget).
bool BufferedStepTileFits(const StepArgs& args);

// True if the K = V = 128 head kernel can run these arguments.
bool BufferedStepHeadFits(const StepArgs& args);

// True if the streaming kernels can run the streaming items of these arguments (K = V = 128,
// max_tokens <= kStreamMaxTokens, max_rows <= kStreamMaxRows, 16-byte aligned rows).
bool BufferedStepStreamFits(const StepArgs& args);

// A streaming kernel over the `count` items from index `first`: one block per (item, value head,
// column tile), the state tile streamed into registers; `fold`: the items fold their buffer
// first (the state tile is written back), otherwise none does.
cudaError_t LaunchBufferedStepStream(const StepArgs& args, int32_t first, int32_t count, bool fold,
                                     cudaStream_t stream);

// The head kernel: one block per (item, value head), the 64 KB state by one bulk copy.
cudaError_t LaunchBufferedStepHead(const StepArgs& args, cudaStream_t stream);

// The tile kernel: one block per (item, value head), the state staged by cp.async.
cudaError_t LaunchBufferedStepTile(const StepArgs& args, cudaStream_t stream);

}  // namespace kvbuffer::cuda
