// Latency samples per RPC name, and their percentiles.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvbuffer::mock {

struct LatencySummary {
  int64_t calls = 0;
  double p50_ms = 0;
  double p99_ms = 0;
  double max_ms = 0;
};

// Not thread-safe: one per worker thread, merged at the end.
class LatencyRecorder {
 public:
  // Adds one call of `rpc` that took `d`.
  void Record(absl::string_view rpc, absl::Duration d);

  // Adds every sample of `other`.
  void Merge(const LatencyRecorder& other);

  // Calls and percentiles per RPC, by name.
  std::map<std::string, LatencySummary> Summarize() const;

  // Calls recorded, all RPCs together.
  int64_t total_calls() const;

 private:
  std::map<std::string, std::vector<double>, std::less<>> samples_ms_;
};

}  // namespace kvbuffer::mock
