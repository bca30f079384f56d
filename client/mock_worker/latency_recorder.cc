#include "client/mock_worker/latency_recorder.h"

#include <algorithm>
#include <cmath>

namespace kvbuffer::mock {

namespace {

// Nearest-rank percentile of sorted samples.
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

}  // namespace

void LatencyRecorder::Record(absl::string_view rpc, absl::Duration d) {
  auto it = samples_ms_.find(rpc);
  if (it == samples_ms_.end())
    it = samples_ms_.emplace(std::string(rpc), std::vector<double>()).first;
  it->second.push_back(absl::ToDoubleMilliseconds(d));
}

void LatencyRecorder::Merge(const LatencyRecorder& other) {
  for (const auto& [rpc, samples] : other.samples_ms_) {
    std::vector<double>& mine = samples_ms_[rpc];
    mine.insert(mine.end(), samples.begin(), samples.end());
  }
}

std::map<std::string, LatencySummary> LatencyRecorder::Summarize() const {
  std::map<std::string, LatencySummary> out;
  for (const auto& [rpc, samples] : samples_ms_) {
    std::vector<double> sorted = samples;
    std::sort(sorted.begin(), sorted.end());
    LatencySummary& s = out[rpc];
    s.calls = static_cast<int64_t>(sorted.size());
    s.p50_ms = Percentile(sorted, 50);
    s.p99_ms = Percentile(sorted, 99);
    s.max_ms = sorted.empty() ? 0 : sorted.back();
  }
  return out;
}

int64_t LatencyRecorder::total_calls() const {
  int64_t n = 0;
  for (const auto& [rpc, samples] : samples_ms_) n += static_cast<int64_t>(samples.size());
  return n;
}

}  // namespace kvbuffer::mock
