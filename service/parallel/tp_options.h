// Settings of a tensor-parallel group's protocol (tp_protocol.h), shared by rank 0 and the
// workers: block size of the command broadcast, deadlines, heartbeats.
#pragma once

#include <cstddef>
#include <functional>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "service/parallel/host_buffer.h"

namespace kvbuffer::parallel {

struct TpOptions {
  // Bytes of the command block broadcast first (header + metadata + small inputs inline) and of
  // its part every rank copies to its host. Every rank must use the same value.
  size_t command_bytes = 64 << 10;
  // Rank 0 grows the command block up to this size so that the inputs of the steps it sends fit
  // inline (no separate round for them); it returns to command_bytes when idle. At most
  // command_bytes: the block never grows. Only rank 0 reads it.
  size_t max_block_bytes = 16 << 20;
  // Longest a command's rounds may take on any rank before the group is declared broken.
  absl::Duration op_timeout = absl::Seconds(60);
  // Rank 0 sends a heartbeat (kNoop) after this long without a command (0: never); it also
  // refreshes every rank's memory figures.
  absl::Duration heartbeat_interval = absl::Seconds(2);
  // A worker that hears nothing from rank 0 for this long gives up (rank 0 died or hangs).
  absl::Duration idle_timeout = absl::Seconds(30);
  // Rank 0: called once, under the group's lock, when the group breaks (mark health NOT_SERVING;
  // do not call back into the backend).
  std::function<void(const absl::Status&)> on_broken;
  // One process driving every rank (MakeInProcessTpBackend): a step with host activations goes
  // straight to every rank's backend on its own thread (HostStepFanout): each rank copies and
  // checks its slice, transfers it to its GPU over its own link, and lands its outputs in their
  // heads; no GPU-to-GPU traffic is needed for that. false: such steps take the NCCL protocol
  // like every other command. Ignored when ranks live in other processes.
  bool direct_host_steps = true;
  // Host scratch of direct host steps (page-locked memory for GPU ranks makes copies direct).
  HostAllocator direct_scratch_allocator = HeapAllocator();
  // Threads per rank that copy and check its slice of a direct host step (0: one).
  int32_t direct_copy_threads = 0;
  // How long the threads of direct host steps spin for the next step before they sleep: a wake-up
  // from sleep costs tens of microseconds, so steps that follow each other within this never pay
  // it; an idle group stops using CPU after it.
  absl::Duration direct_spin = absl::Microseconds(200);
};

}  // namespace kvbuffer::parallel
