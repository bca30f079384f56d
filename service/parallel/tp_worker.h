// The loop of a tensor-parallel rank > 0: receive a command from rank 0, run its part on the
// rank's shard, report status and outputs back, until rank 0 says shutdown or the group fails.
// Runs on a thread (one process driving all GPUs) or as a process's main loop (one process per
// GPU; see bootstrap/).
#pragma once

#include "absl/status/status.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/tp_options.h"
#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

// Serves rank 0's commands on `transport` (rank > 0) with `compute`. Returns OK after kShutdown;
// UNAVAILABLE when rank 0 is silent for options.idle_timeout or a round misses its deadline;
// INTERNAL on a protocol or device error. On any failure the transport is aborted first.
absl::Status RunTpWorker(TpTransport& transport, ShardCompute& compute, const TpOptions& options);

}  // namespace kvbuffer::parallel
