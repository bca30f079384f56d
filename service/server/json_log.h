// Structured log lines: one JSON object per line (or a human-readable text line) written whole
// to a FILE* (stderr by default), with an RFC 3339 UTC timestamp, a level and an event name,
// then the caller's fields in order. Never give it tensor contents or sequence data: callers log
// ids, counts, sizes and status names only.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvbuffer::server {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class LogFormat { kJson, kText };

// "debug", "info", "warning" or "error".
std::string_view LogLevelName(LogLevel level);
// The level named `name` (debug, info, warning/warn, error); INVALID_ARGUMENT otherwise.
absl::StatusOr<LogLevel> ParseLogLevel(std::string_view name);
// The format named `name` ("json" or "text"); INVALID_ARGUMENT otherwise.
absl::StatusOr<LogFormat> ParseLogFormat(std::string_view name);

// `text` as the body of a JSON string (no quotes): ", \ and control characters escaped, invalid
// UTF-8 bytes replaced by U+FFFD so every line stays valid JSON.
std::string JsonEscape(std::string_view text);

// `t` as RFC 3339 in UTC with milliseconds, e.g. "2024-05-01T12:00:00.123Z".
std::string Rfc3339Utc(absl::Time t);

// One field of a log line: a string, a (signed or unsigned) integer, a real number or a boolean.
struct LogField {
  using Value = std::variant<std::string, int64_t, uint64_t, double, bool>;
  std::string key;
  Value value;

  LogField(std::string k, std::string v) : key(std::move(k)), value(std::move(v)) {}
  LogField(std::string k, std::string_view v) : key(std::move(k)), value(std::string(v)) {}
  LogField(std::string k, const char* v) : key(std::move(k)), value(std::string(v)) {}
  LogField(std::string k, int64_t v) : key(std::move(k)), value(v) {}
  LogField(std::string k, int32_t v) : key(std::move(k)), value(int64_t{v}) {}
  LogField(std::string k, uint64_t v) : key(std::move(k)), value(v) {}
  LogField(std::string k, double v) : key(std::move(k)), value(v) {}
  LogField(std::string k, bool v) : key(std::move(k)), value(v) {}
};

// The line (without newline) for one event: JSON {"timestamp":..,"level":..,"event":..,fields}
// or text "timestamp LEVEL event key=value ..." (text values with spaces or quotes are quoted).
std::string FormatLogLine(LogFormat format, absl::Time time, LogLevel level, std::string_view event,
                          const std::vector<LogField>& fields);

class LogWriter {
 public:
  // Writes lines of `format` at `min_level` and above to `out` (not owned; must outlive it).
  explicit LogWriter(LogFormat format = LogFormat::kJson, LogLevel min_level = LogLevel::kInfo,
                     FILE* out = stderr);

  // Whether an event of `level` would be written.
  bool Enabled(LogLevel level) const { return level >= min_level_; }

  // Writes one line for `event` (now) if `level` is enabled; lines from threads never interleave.
  void Log(LogLevel level, std::string_view event, const std::vector<LogField>& fields);

  LogFormat format() const { return format_; }

 private:
  const LogFormat format_;
  const LogLevel min_level_;
  FILE* const out_;
  absl::Mutex mu_;
};

}  // namespace kvbuffer::server
