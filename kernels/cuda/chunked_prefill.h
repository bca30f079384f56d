// Chunked prefill in the UT form (chunk 64) on tensor cores (bf16 mma.sync, fp32 accumulation):
// a chunk-parallel kernel builds A = (I + L)^-1, W = A (beta e^G K^), U = A (beta V) and
// P = (Q^ K^^T) o Gamma; a sequential kernel per (sequence, value head, column tile) carries the
// state through the chunks, writes outputs, the state at fold_tokens, and the tail buffer rows.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/gdn_device.h"

namespace kvbuffer::cuda {

// Arguments of LaunchChunkedPrefill.
struct ChunkArgs {
  Geometry g;
  int32_t layer = 0;
  const StepDesc* items = nullptr;  // chunked items have state_slot >= 0, already folded
  const ChunkUnit* units = nullptr;
  int32_t num_units = 0;
  const ChunkItem* chunk_items = nullptr;
  int32_t num_chunk_items = 0;
  const int32_t* page_table = nullptr;
  Pools pools;
  Prepared prep;  // bf16 qh, kh, vh; fp32 beta and chunk-local G of every chunk token
  ChunkScratch scratch;
  void* out = nullptr;
  int32_t out_dtype = kF32;
};

// True if the tensor-core kernels are instantiated for these head dims.
bool ChunkedPrefillSupported(int32_t K, int32_t V);

// The chunk-parallel kernel: W, U and P of every (unit, value head).
cudaError_t LaunchChunkLocal(const ChunkArgs& args, cudaStream_t stream);

// The sequential kernel: one block per (chunked item, value head) over the item's units.
cudaError_t LaunchChunkState(const ChunkArgs& args, cudaStream_t stream);

// Runs the chunk-local kernel over all units, then the sequential state kernel over all items.
cudaError_t LaunchChunkedPrefill(const ChunkArgs& args, cudaStream_t stream);

}  // namespace kvbuffer::cuda
