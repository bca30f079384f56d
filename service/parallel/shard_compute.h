// ShardCompute: what a tensor-parallel rank runs its head shard on. A Backend for everything that
// carries no activations (pools, folds, commits, state reads), plus a step whose activations and
// outputs live in transport memory: device memory of the rank's GPU under NCCL, host memory
// in-process. This is the adapter where a backend that reads device-resident inputs plugs in
// (see README.md: the CudaBackend extension); until then MakeStagedShardCompute routes any
// Backend through host memory.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"
#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

class ShardCompute {
 public:
  virtual ~ShardCompute() = default;

  // The shard's backend.
  virtual Backend& backend() = 0;

  // Allocates the shard's backend for its `shard` config (and remembers the config).
  virtual absl::Status Allocate(const ModelConfig& shard, const std::vector<LayerParams>& params,
                                const PoolSizes& sizes) = 0;

  // Runs `step`, whose qkv, a, b and out point into `transport` memory, ordered after what is
  // already enqueued on the transport; the outputs are in place once the transport syncs. May
  // sync the transport itself, within `timeout`.
  virtual absl::Status RunStepInTransport(const LayerStep& step, TpTransport& transport,
                                          absl::Duration timeout) = 0;
};

// For host-accessible transports and backends that compute on host memory (CPU shards in CI):
// syncs the transport, then runs the step in place.
std::unique_ptr<ShardCompute> MakeInPlaceShardCompute(std::unique_ptr<Backend> backend);

// For any backend and transport: syncs, copies the inputs to host scratch, runs the step on host
// memory and enqueues the copy of the outputs back. The path of a CudaBackend that only takes
// host activations (two extra PCIe copies and a host sync per step).
std::unique_ptr<ShardCompute> MakeStagedShardCompute(std::unique_ptr<Backend> backend);

// Runs a step whose qkv, a, b and out are device pointers on the backend's GPU, enqueued on
// `stream` (a cudaStream_t) after the work already there, without a host sync; `out` is complete
// when the stream gets there. UNIMPLEMENTED when the backend cannot. This is the CudaBackend
// extension tensor parallelism needs (README.md), passed in as a function so that this layer
// does not depend on the CUDA backend's headers.
using DeviceStepFn =
    std::function<absl::Status(Backend& backend, const LayerStep& step, void* stream)>;

// For a device transport: runs steps with `device_step` on the transport's stream (no host
// round trip); if it answers UNIMPLEMENTED (or is empty), uses the staged path from then on.
std::unique_ptr<ShardCompute> MakeDeviceShardCompute(std::unique_ptr<Backend> backend,
                                                     DeviceStepFn device_step);

}  // namespace kvbuffer::parallel
