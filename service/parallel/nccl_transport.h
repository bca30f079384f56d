// NcclTransport: TpTransport over NCCL on one GPU per rank. Transport memory is device memory of
// the rank's GPU; every operation is enqueued on one CUDA stream of the rank; collectives use a
// non-blocking communicator so that no NCCL call can hang the caller: Sync() polls the stream
// and ncclCommGetAsyncError with a deadline and calls ncclCommAbort when it passes.
//
// No NCCL or CUDA type appears here: unique ids travel as bytes (the gRPC bootstrap hands them
// out), streams as void*. NCCL_NVLS_ENABLE is set to 0 before any communicator is made, unless
// the environment sets it: NVLink multicast stays off.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

// Sets NCCL_NVLS_ENABLE=0 unless the environment already sets it.
void KeepNvlinkMulticastOff();

// A new NCCL unique id (rank 0 of a multi-process group makes it and hands it out), as bytes.
absl::StatusOr<std::string> NewNcclUniqueId();

// Joins rank `rank` of `world` on GPU `device` to the group of `unique_id`, waiting at most
// `init_timeout` for every rank to join (UNAVAILABLE then). Operations that cannot even be
// enqueued within `enqueue_timeout` fail the same way.
absl::StatusOr<std::unique_ptr<TpTransport>> MakeNcclTransport(
    const std::string& unique_id, int32_t rank, int32_t world, int device,
    absl::Duration init_timeout, absl::Duration enqueue_timeout = absl::Seconds(60));

// Every rank of a group in this process, rank r on devices[r] (what ncclCommInitAll does, with
// the non-blocking configuration that ncclCommInitAll cannot take).
absl::StatusOr<std::vector<std::unique_ptr<TpTransport>>> MakeNcclTransportsInProcess(
    const std::vector<int>& devices, absl::Duration init_timeout,
    absl::Duration enqueue_timeout = absl::Seconds(60));

// The NCCL version the binary runs with, e.g. "2.28.9".
std::string NcclVersionString();

}  // namespace kvbuffer::parallel
