#include "service/parallel/nccl_group.h"

#include <cuda_runtime.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "service/parallel/nccl_transport.h"
#include "service/parallel/tp_worker.h"

namespace kvbuffer::parallel {
namespace {

absl::StatusOr<std::unique_ptr<ShardCompute>> MakeRankCompute(const NcclGroupOptions& o,
                                                              int32_t rank, int device) {
  if (!o.make_backend) return absl::InvalidArgumentError("NcclGroupOptions.make_backend is empty");
  std::unique_ptr<Backend> backend = o.make_backend(rank, device);
  if (backend == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("could not create the backend of rank ", rank, " on GPU ", device));
  }
  return MakeDeviceShardCompute(std::move(backend), o.device_step);
}

void* PinnedAllocate(size_t bytes) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void PinnedFree(void* p) { cudaFreeHost(p); }

}  // namespace

HostAllocator PinnedHostAllocator() { return HostAllocator{&PinnedAllocate, &PinnedFree}; }

absl::StatusOr<std::unique_ptr<TpBackend>> MakeNcclGroupInProcess(const std::vector<int>& devices,
                                                                  NcclGroupOptions options) {
  absl::StatusOr<std::vector<std::unique_ptr<TpTransport>>> transports =
      MakeNcclTransportsInProcess(devices, options.init_timeout, options.tp.op_timeout);
  if (!transports.ok()) return transports.status();
  std::vector<std::unique_ptr<ShardCompute>> computes;
  for (size_t r = 0; r < devices.size(); ++r) {
    absl::StatusOr<std::unique_ptr<ShardCompute>> c =
        MakeRankCompute(options, static_cast<int32_t>(r), devices[r]);
    if (!c.ok()) return c.status();
    computes.push_back(*std::move(c));
  }
  // Direct host steps copy each rank's slice into page-locked memory (portable: every GPU of the
  // process transfers from it directly).
  options.tp.direct_scratch_allocator = PinnedHostAllocator();
  return MakeInProcessTpBackend(*std::move(transports), std::move(computes), std::move(options.tp));
}

absl::StatusOr<std::unique_ptr<TpBackend>> MakeNcclGroupLeader(const std::string& unique_id,
                                                               int32_t world, int device,
                                                               NcclGroupOptions options) {
  absl::StatusOr<std::unique_ptr<ShardCompute>> compute = MakeRankCompute(options, 0, device);
  if (!compute.ok()) return compute.status();
  absl::StatusOr<std::unique_ptr<TpTransport>> transport =
      MakeNcclTransport(unique_id, 0, world, device, options.init_timeout, options.tp.op_timeout);
  if (!transport.ok()) return transport.status();
  return TpBackend::Create(*std::move(transport), *std::move(compute), std::move(options.tp));
}

absl::Status RunNcclGroupWorker(const std::string& unique_id, int32_t rank, int32_t world,
                                int device, const NcclGroupOptions& options) {
  if (rank <= 0) return absl::InvalidArgumentError("workers are ranks > 0");
  absl::StatusOr<std::unique_ptr<ShardCompute>> compute = MakeRankCompute(options, rank, device);
  if (!compute.ok()) return compute.status();
  absl::StatusOr<std::unique_ptr<TpTransport>> transport = MakeNcclTransport(
      unique_id, rank, world, device, options.init_timeout, options.tp.op_timeout);
  if (!transport.ok()) return transport.status();
  absl::Status s = RunTpWorker(**transport, **compute, options.tp);
  // The shard's backend goes before the communicator (its memory is on the same GPU).
  compute->reset();
  return s;
}

}  // namespace kvbuffer::parallel
