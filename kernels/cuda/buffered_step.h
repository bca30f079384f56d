// Buffered decode / verify / fold over the checkpoint state (DESIGN §2, buffered form): one pass
// over S_c computing p = S^T q^ and r = S^T k^ for every token, combined with the buffer rows;
// a due flush is fused into the same pass; a stateless item uses p = r = 0.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/cuda/gdn_device.h"

namespace kvbuffer::cuda {

// Most tokens of one item in one buffered launch (drafts per verify, or a slice of a prefill).
inline constexpr int32_t kMaxStepTokens = 16;
// Most tokens of one item the streaming kernels take (decode and verify of up to 4 drafts).
inline constexpr int32_t kStreamMaxTokens = 4;
// Most buffer rows of one item the streaming kernels take.
inline constexpr int32_t kStreamMaxRows = 64;
// Value columns one block handles.
inline constexpr int32_t kStepBV = 32;

// Arguments of LaunchBufferedStep.
struct StepArgs {
  Geometry g;
  int32_t layer = 0;
  const StepDesc* items = nullptr;  // num_tokens in [0, kMaxStepTokens]; 0 = fold only
  int32_t num_items = 0;
  const int32_t* page_table = nullptr;
  Pools pools;
  Prepared prep;        // fp32 q, k, v, beta and G relative to the (post-fold) checkpoint
  void* out = nullptr;  // [T][HV][V] out_dtype
  int32_t out_dtype = kF32;
  int32_t* counters = nullptr;  // [num_items][H] ints, zero on entry, left zero
  int32_t max_tokens = 0;       // max num_tokens over items
  int32_t max_rows = 0;         // max buffer rows read for combination (non-folding items)
  bool any_fold = false;
  // Items [stream_begin, num_items) are streaming items: no kFoldAfter / kChunked flag,
  // 0..kStreamMaxTokens tokens (0 only with kFoldFirst) and at most kStreamMaxRows buffer rows;
  // among them [stream_begin, stream_fold_end) carry kFoldFirst and the rest do not. Streaming
  // items may go to the streaming kernels while items [0, stream_begin) go to the general ones.
  // -1: no such promise (every item goes to the general kernels).
  int32_t stream_begin = -1;
  int32_t stream_fold_end = -1;
  int32_t stream_max_tokens = 0;  // max num_tokens over the streaming items
  int32_t stream_max_rows = 0;    // max buffer_rows over the streaming items
  // 0: best that fits (streaming items: streaming kernels, shape chosen by measurement; others:
  // head kernel with bulk copies, tile, register); 1: register kernel; 2: tile kernel; 3: head
  // kernel with cp.async instead of bulk copies; 4: persistent head kernel (the next unit's state
  // copy overlaps this unit's tail; slower, bench/NOTES.md v6); 5: the head kernel with bulk
  // copies, one block per (item, value head), also for plain items (v5); 7: streaming kernels with
  // 32-column tiles (same as 0 for streaming items); 8: streaming kernels with 64-column tiles; 9:
  // as 8, state loads with an L2 256-byte prefetch hint; 10: 128-column tiles (a whole head per
  // block); 11: 64 columns, 16 state rows per thread; 12: 128 columns, 16 state rows per thread;
  // 13: 32 columns, 16 state rows per thread.
  int32_t variant = 0;
  // Head kernel: blocks of the first waves start (wave % 3) * stagger_ns late, so that the
  // co-resident blocks of an SM load and compute out of phase (0: off).
  int32_t stagger_ns = 0;
  int32_t num_sms = 132;
};

// Dynamic shared memory a launch with these arguments needs.
size_t BufferedStepSmemBytes(const StepArgs& args);

// For every item, value head and 32-column tile: loads the state tile once, folds the buffer first
// when kFoldFirst (new rows then start at row 0; the k^/G rows shared across blocks are written
// only by the last block of the key-head group to finish reading the old rows), computes outputs
// and the new buffer rows (k^, u, G) of its tokens, and writes the state back if it changed.
cudaError_t LaunchBufferedStep(const StepArgs& args, cudaStream_t stream);

}  // namespace kvbuffer::cuda
