// The last step of a graceful shutdown: once no call can reach the engine any more, every open
// sequence's buffers are folded into its state (Engine::Flush), so that what the server holds is
// checkpoints only. Sequences with uncommitted drafts are left exactly as they are (folding would
// need a commit the client never sent) and are reported, as is any flush that fails.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "service/engine/engine.h"

namespace kvbuffer::server {

struct DrainReport {
  int32_t open = 0;                         // sequences open when the drain flush started
  int32_t flushed = 0;                      // had buffered rows, now folded into their states
  int32_t clean = 0;                        // had nothing buffered
  std::vector<SequenceKey> pending_drafts;  // left as they were
  std::vector<std::pair<SequenceKey, std::string>> failed;  // flush failed: the error
};

// Flushes every open sequence of every tenant, one at a time (one failure holds back no other);
// skips and lists those with drafts pending. Run only when no call can reach `engine`.
DrainReport FlushOpenSequences(Engine* engine);

// One line for the log: counts, then the sequences left with drafts and the failures (the first
// few of each, by tenant and id).
std::string FormatDrainReport(const DrainReport& report);

}  // namespace kvbuffer::server
