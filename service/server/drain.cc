#include "service/server/drain.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvbuffer::server {

namespace {

constexpr size_t kListedAtMost = 8;

std::string KeyString(const SequenceKey& k) {
  return absl::StrCat("tenant \"", k.tenant, "\" id ", k.id);
}

}  // namespace

DrainReport FlushOpenSequences(Engine* engine) {
  DrainReport report;
  const std::vector<SequenceKey> keys = engine->ListSequences();
  report.open = static_cast<int32_t>(keys.size());
  for (const SequenceKey& key : keys) {
    absl::StatusOr<SequenceInfo> info = engine->Describe(key.tenant, key.id);
    if (!info.ok()) {  // closed meanwhile (cannot happen once calls are stopped)
      report.failed.push_back({key, std::string(info.status().message())});
      continue;
    }
    if (info->pending_drafts > 0) {
      report.pending_drafts.push_back(key);
      continue;
    }
    if (info->buffer_pages == 0) {
      ++report.clean;
      continue;
    }
    if (absl::Status s = engine->Flush(key.tenant, {key.id}); !s.ok()) {
      report.failed.push_back({key, s.ToString()});
      continue;
    }
    ++report.flushed;
  }
  return report;
}

std::string FormatDrainReport(const DrainReport& r) {
  std::string out =
      absl::StrCat("drain flush: ", r.open, " open sequence(s): ", r.flushed, " flushed, ", r.clean,
                   " had nothing buffered, ", r.pending_drafts.size(),
                   " left with pending drafts, ", r.failed.size(), " failed");
  if (!r.pending_drafts.empty()) {
    absl::StrAppend(&out, "; pending drafts:");
    for (size_t i = 0; i < std::min(r.pending_drafts.size(), kListedAtMost); ++i) {
      absl::StrAppend(&out, i == 0 ? " " : ", ", KeyString(r.pending_drafts[i]));
    }
    if (r.pending_drafts.size() > kListedAtMost) absl::StrAppend(&out, ", ...");
  }
  if (!r.failed.empty()) {
    absl::StrAppend(&out, "; failed:");
    for (size_t i = 0; i < std::min(r.failed.size(), kListedAtMost); ++i) {
      absl::StrAppend(&out, i == 0 ? " " : ", ", KeyString(r.failed[i].first), " (",
                      r.failed[i].second, ")");
    }
    if (r.failed.size() > kListedAtMost) absl::StrAppend(&out, ", ...");
  }
  return out;
}

}  // namespace kvbuffer::server
