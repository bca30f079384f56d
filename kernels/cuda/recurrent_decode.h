// Recurrent Gated DeltaNet decode, the baseline every serving engine ships: read S, decay, delta
// rule update, output, write S (DESIGN §2, first block).
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/gdn_device.h"

namespace kvbuffer::cuda {

// Arguments of LaunchRecurrentDecode: token b of the call uses state slot slots[b].
struct RecurrentArgs {
  Geometry g;
  int32_t layer = 0;
  const int32_t* slots = nullptr;
  int32_t batch = 0;
  Pools pools;
  Prepared prep;  // fp32 q, k, v, beta; G holds g of the token (checkpoint = previous state)
  void* out = nullptr;
  int32_t out_dtype = kF32;
  int32_t variant = 0;  // 0: shared-memory tile (cp.async) where it fits; 1: register tile
};

// One recurrent step per batch entry: S <- e^g S + k^ u^T with u = beta (v - (e^g S)^T k^), and
// o = S^T q^; the state is read and written once.
cudaError_t LaunchRecurrentDecode(const RecurrentArgs& args, cudaStream_t stream);

}  // namespace kvbuffer::cuda
