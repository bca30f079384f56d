// The server process's own memory, as an operator (and the load test) wants to see it: what the
// kernel holds resident and what the C allocator has handed out and not taken back.
#pragma once

#include <cstdint>

namespace kvbuffer::metrics {

struct ProcessMemory {
  int64_t resident_bytes = -1;     // VmRSS (/proc/self/statm); -1 if unreadable
  int64_t heap_in_use_bytes = -1;  // glibc mallinfo2: in-use chunks of every arena plus mmapped
                                   // blocks; -1 where the allocator does not report it
};

// Reads both numbers now. The heap figure takes each malloc arena's lock briefly, so call it per
// scrape, never per request.
ProcessMemory ReadProcessMemory();

}  // namespace kvbuffer::metrics
