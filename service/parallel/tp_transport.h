// TpTransport: one rank's view of the data movement of a tensor-parallel group. Implementations:
// NcclTransport (device memory of the rank's GPU, NCCL collectives on one CUDA stream; nccl/) and
// LocalTransport (host memory, in-process mailboxes; CI tests of the protocol without a GPU).
//
// Operations are enqueued in order on the rank's queue and complete at Sync(), which waits with a
// deadline: a peer that died or hangs turns into UNAVAILABLE (and the transport aborts itself)
// instead of a hung caller. Buffers passed to the data operations are transport memory from
// Allocate(), except the host sides of the copies.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvbuffer::parallel {

class TpTransport {
 public:
  virtual ~TpTransport() = default;

  // This rank (0 = the leader, which fronts the group) and the number of ranks.
  virtual int32_t rank() const = 0;
  virtual int32_t world_size() const = 0;

  // Whether transport memory is ordinary host memory (then compute may read it directly).
  virtual bool host_accessible() const = 0;

  // The queue that compute must be ordered on (a cudaStream_t for NCCL; nullptr in-process).
  virtual void* stream() const = 0;

  // Allocates `bytes` of transport memory (RESOURCE_EXHAUSTED if it cannot).
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  // Frees memory from Allocate; nothing may be in flight on it.
  virtual void Free(void* p) = 0;
  // Allocates `bytes` of host memory that copies to and from transport memory are fastest from
  // (page-locked under CUDA); nullptr when it cannot.
  virtual void* AllocateHost(size_t bytes) = 0;
  // Frees memory from AllocateHost.
  virtual void FreeHost(void* p) = 0;

  // Enqueues a copy of host memory into transport memory.
  virtual absl::Status CopyIn(void* dst, const void* host_src, size_t bytes) = 0;
  // Enqueues a copy of transport memory into host memory.
  virtual absl::Status CopyOut(void* host_dst, const void* src, size_t bytes) = 0;
  // Enqueues a strided copy of `rows` rows of `width` bytes out of transport memory.
  virtual absl::Status CopyOut2D(void* host_dst, size_t dst_pitch, const void* src,
                                 size_t src_pitch, size_t width, size_t rows) = 0;
  // Enqueues a strided copy of `rows` rows of `width` bytes within transport memory.
  virtual absl::Status Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                              size_t width, size_t rows) = 0;

  // Enqueues a broadcast of `bytes` bytes from rank 0's `buf` into every other rank's `buf`.
  virtual absl::Status Broadcast(void* buf, size_t bytes) = 0;
  // Starts a group: the sends, receives and broadcasts until GroupEnd run as one (no ordering
  // among them, so matching sends and receives cannot deadlock).
  virtual absl::Status GroupStart() = 0;
  // Enqueues a send of `bytes` bytes to rank `peer` (inside a group).
  virtual absl::Status Send(const void* buf, size_t bytes, int32_t peer) = 0;
  // Enqueues a receive of exactly `bytes` bytes from rank `peer` (inside a group).
  virtual absl::Status Recv(void* buf, size_t bytes, int32_t peer) = 0;
  // Ends a group.
  virtual absl::Status GroupEnd() = 0;

  // Waits until everything enqueued has completed. UNAVAILABLE when `timeout` passes first or a
  // peer is gone (the transport is aborted then), INTERNAL on a device or library error. After a
  // failure every call fails.
  virtual absl::Status Sync(absl::Duration timeout) = 0;

  // Tears the group down from this rank so that peers blocked on it fail instead of hanging.
  virtual void Abort() = 0;

  // OK until the transport failed or was aborted; then the status that broke it.
  virtual absl::Status Health() const = 0;
};

// Runs `body` (sends and receives) between t.GroupStart() and t.GroupEnd(); GroupEnd runs whenever
// GroupStart succeeded, so that no group stays open on the calling thread. The first failure.
inline absl::Status InGroup(TpTransport& t, absl::FunctionRef<absl::Status()> body) {
  if (absl::Status s = t.GroupStart(); !s.ok()) return s;
  const absl::Status b = body();
  const absl::Status e = t.GroupEnd();
  return b.ok() ? e : b;
}

}  // namespace kvbuffer::parallel
