// A tensor-parallel group over NCCL: one rank per GPU, heads sharded over the ranks, rank 0's
// TpBackend fronting the group for the engine. Two ways to run it:
//   A. one process drives every GPU: MakeNcclGroupInProcess (rank r on devices[r]; ranks > 0 on
//      threads of the returned backend);
//   B. one process per GPU, possibly on other hosts: rank 0 makes a unique id
//      (NewNcclUniqueId) and hands it out with the rank numbers (bootstrap/, over gRPC); rank 0
//      calls MakeNcclGroupLeader, every other rank RunNcclGroupWorker.
// Only with CUDA and NCCL (KVB_HAVE_NCCL). NVLink multicast is kept off (NCCL_NVLS_ENABLE=0).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service/engine/backend.h"
#include "service/parallel/host_buffer.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/tp_backend.h"
#include "service/parallel/tp_options.h"

namespace kvbuffer::parallel {

// Makes the backend of rank `rank` on GPU `device` (e.g. MakeCudaBackend(device)); nullptr if it
// cannot.
using RankBackendFactory = std::function<std::unique_ptr<Backend>(int32_t rank, int device)>;

struct NcclGroupOptions {
  TpOptions tp;
  // Longest wait for every rank to join the communicator.
  absl::Duration init_timeout = absl::Minutes(2);
  RankBackendFactory make_backend;
  // How a rank runs a step on activations already in its GPU's memory (the CudaBackend
  // extension); empty or UNIMPLEMENTED: staged through host memory.
  DeviceStepFn device_step;
};

// Mode A: every rank in this process, rank r on devices[r].
absl::StatusOr<std::unique_ptr<TpBackend>> MakeNcclGroupInProcess(const std::vector<int>& devices,
                                                                  NcclGroupOptions options);

// Mode B, rank 0 on GPU `device`: joins the group of `unique_id` (waits for all `world` ranks).
absl::StatusOr<std::unique_ptr<TpBackend>> MakeNcclGroupLeader(const std::string& unique_id,
                                                               int32_t world, int device,
                                                               NcclGroupOptions options);

// Mode B, rank `rank` > 0 on GPU `device`: joins the group and serves rank 0 until it says
// shutdown (OK) or the group fails (the failure).
absl::Status RunNcclGroupWorker(const std::string& unique_id, int32_t rank, int32_t world,
                                int device, const NcclGroupOptions& options);

// Page-locked host memory (cudaHostAlloc), for a ShardedBackend over GPU backends.
HostAllocator PinnedHostAllocator();

}  // namespace kvbuffer::parallel
