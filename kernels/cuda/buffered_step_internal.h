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

// The head kernel: one block per (item, value head), the 64 KB state by one bulk copy.
cudaError_t LaunchBufferedStepHead(const StepArgs& args, cudaStream_t stream);

// The tile kernel: one block per (item, value head), the state staged by cp.async.
cudaError_t LaunchBufferedStepTile(const StepArgs& args, cudaStream_t stream);

}  // namespace kvbuffer::cuda
