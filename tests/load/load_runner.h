// A bounded loopback load: many concurrent mock-worker Streams (each with its own sequences,
// mixing prefill, decode and draft verification, every output checked against an fp64 oracle)
// against one kvbuffer-server process, in several passes. After every pass every sequence is
// closed and the server must report all of its pool elements free; its resident memory (read from
// /proc) must not grow from pass to pass once warm.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/mock_worker/mock_session.h"
#include "tests/integration/test_servers.h"

namespace kvbuffer::load {

struct LoadOptions {
  std::string server;     // host:port of the server under load
  pid_t server_pid = -1;  // its process, for RSS (-1: not sampled)
  int metrics_port = -1;  // its /metrics on 127.0.0.1, for heap in use (-1: not read)
  int32_t sessions = 64;  // concurrent Streams (one worker thread each)
  int32_t rounds = 1000;  // model steps per session and pass
  int32_t passes = 3;
  int32_t warmup_passes = 1;  // memory is compared from the end of these to the end of the last
  int32_t batch = 2;          // sequences a session keeps open at once
  int32_t steps = 24;         // most steps in a sequence's life (then it closes, a new one opens)
  int32_t max_prompt = 96;
  double verify_fraction = 0.4;
  uint64_t seed = 1;
  // From the end of the warm-up passes to the end of the last, the heap in use (bytes malloc handed
  // out and not yet freed: a leak shows here) may grow by at most max(heap_slack_kb,
  // heap_slack_fraction x its size then), and the resident set (which also moves with how the
  // allocator's arenas happen to fill) by at most max(rss_slack_kb, rss_slack_fraction x).
  int64_t heap_slack_kb = 2 * 1024;
  double heap_slack_fraction = 0.02;
  int64_t rss_slack_kb = 16 * 1024;
  double rss_slack_fraction = 0.10;
};

struct PassResult {
  mock::MockSessionReport report;
  int64_t rss_kb = -1;       // server RSS after the pass
  int64_t rss_peak_kb = -1;  // highest RSS sampled during the pass
  int64_t heap_kb = -1;      // server heap in use after the pass (-1: not read)
  int32_t open_sequences = -1;
  int32_t free_state_slots = -1, state_slots = -1;
  int32_t free_buffer_pages = -1, buffer_pages = -1;
};

struct LoadResult {
  LoadOptions options;
  std::vector<PassResult> passes;
  std::vector<std::string> failures;  // empty: the load held

  bool ok() const { return failures.empty(); }
};

// kvbuffer-server in a child process sized for `o` (sessions x batch sequences, six pages each)
// with /metrics on an ephemeral port, plus `extra_args`; sets o->server, o->server_pid and
// o->metrics_port.
absl::StatusOr<std::unique_ptr<testing::ChildServer>> StartLoadServer(
    LoadOptions* o, const std::vector<std::string>& extra_args);

// The value of `kvbuffer_process_memory_bytes{kind="heap_in_use"}` on the /metrics page at
// 127.0.0.1:`port`, in KiB; -1 when the page does not have it (a sanitizer build).
absl::StatusOr<int64_t> ReadHeapInUseKb(int port);

// Resident set size of process `pid` in KiB (VmRSS of /proc/<pid>/status), or -1.
int64_t ReadRssKb(pid_t pid);

// Runs the passes; an error only when the server cannot be reached. What did not hold is listed
// in failures (a mismatch or failed call, a pool element not returned, memory growth).
absl::StatusOr<LoadResult> RunLoad(const LoadOptions& options);

// A Markdown summary: per pass work, mismatches, pools, RSS; latency percentiles per RPC and
// throughput of the last pass; the verdict.
std::string FormatLoadResult(const LoadResult& result);

}  // namespace kvbuffer::load
