// The loop of a tensor-parallel rank > 0: receive a command from rank 0, run its part on the
// rank's shard, report status and outputs back, until rank 0 says shutdown or the group fails.
// Runs on a thread (one process driving all GPUs) or as a process's main loop (one process per
// GPU; see bootstrap/).
#pragma once

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/tp_options.h"
#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

// Rank 0's signal to a worker thread of its own process that a command's broadcast is coming.
// Other threads of the process use the workers' GPUs between commands (direct host steps, other
// groups); a worker must not keep an NCCL receive posted there meanwhile (a device-wide
// synchronisation on that GPU, e.g. by cudaFree, would wait for it forever), so it waits here
// first and posts its receive only for a command that rank 0 is sending.
class TpDoorbell {
 public:
  // One more command is on its way.
  void Ring() {
    absl::MutexLock lock(&mu_);
    ++rung_;
  }
  // Waits until `count` commands have been announced; false after `timeout`.
  bool WaitFor(uint64_t count, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto rung = [this, count]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return rung_ >= count; };
    return mu_.AwaitWithTimeout(absl::Condition(&rung), timeout);
  }

 private:
  absl::Mutex mu_;
  uint64_t rung_ ABSL_GUARDED_BY(mu_) = 0;
};

// Serves rank 0's commands on `transport` (rank > 0) with `compute`. Returns OK after kShutdown;
// UNAVAILABLE when rank 0 is silent for options.idle_timeout or a round misses its deadline;
// INTERNAL on a protocol or device error. On any failure the transport is aborted first.
// `compute_mu`, when not null, is held while a command uses `compute` (an in-process rank 0 may
// drive the same shard between commands: direct host steps); `doorbell`, when not null, announces
// each command before the worker waits for its broadcast.
absl::Status RunTpWorker(TpTransport& transport, ShardCompute& compute, const TpOptions& options,
                         absl::Mutex* compute_mu = nullptr, TpDoorbell* doorbell = nullptr);

}  // namespace kvbuffer::parallel
