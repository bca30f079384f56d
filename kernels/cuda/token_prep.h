// Token preparation on the device: causal conv update + SiLU, l2norm of q and k, gates, cumulative
// G; conv window advance and draft commit.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/gdn_device.h"

namespace kvbuffer::cuda {

// Arguments of LaunchTokenPrep. Activations are device arrays in the call's token order:
// qkv [T][channels], a and b [T][HV], all of in_dtype.
struct PrepArgs {
  Geometry g;
  int32_t layer = 0;
  const StepDesc* items = nullptr;
  const PrepUnit* units = nullptr;
  int32_t num_units = 0;
  const int32_t* page_table = nullptr;
  Pools pools;
  LayerWeights w;
  const void* qkv = nullptr;
  const void* a = nullptr;
  const void* b = nullptr;
  int32_t in_dtype = kF32;
  Prepared out;
  bool chunk_only = false;      // every unit is kChunkMode: allows the vectorised chunk kernel
  int32_t max_unit_tokens = 0;  // 1: every unit has one token (decode); 0: unknown
};

// Prepares every unit's tokens (one block per unit and head): q^, k^, v, beta and cumulative G
// into args.out; advances conv windows (kInlineWindow) or stores draft rows (kStoreDrafts).
cudaError_t LaunchTokenPrep(const PrepArgs& args, cudaStream_t stream);

// Arguments of LaunchConvWindowAdvance: the items (indices into `items`) whose windows move past
// all their tokens, read from qkv.
struct WindowAdvanceArgs {
  Geometry g;
  int32_t layer = 0;
  const StepDesc* items = nullptr;
  const int32_t* item_ids = nullptr;
  int32_t num = 0;
  Pools pools;
  const void* qkv = nullptr;
  int32_t in_dtype = kF32;
};

// Advances the conv windows of the listed items past their num_tokens raw rows.
cudaError_t LaunchConvWindowAdvance(const WindowAdvanceArgs& args, cudaStream_t stream);

// Keeps the first accepted[i] draft rows of conv slot slots[i] on `layer`: the window becomes the
// last W-1 rows of window ++ drafts[0..accepted).
cudaError_t LaunchConvCommit(const Geometry& g, int32_t layer, const Pools& pools,
                             const int32_t* slots, const int32_t* accepted, int32_t num,
                             cudaStream_t stream);

}  // namespace kvbuffer::cuda
