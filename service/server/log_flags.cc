#include "service/server/log_flags.h"

#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, log_format, "json",
          "Structured log lines on stderr (startup, shutdown, every RPC and Stream message): "
          "json (one object per line) or text");
ABSL_FLAG(std::string, log_level, "info",
          "Least severe log level written: debug, info, warning or error (a call that failed is "
          "warning, or error for INTERNAL/UNKNOWN/DATA_LOSS/UNIMPLEMENTED)");

namespace kvbuffer::server {

absl::StatusOr<std::shared_ptr<LogWriter>> LogWriterFromFlags() {
  absl::StatusOr<LogFormat> format = ParseLogFormat(absl::GetFlag(FLAGS_log_format));
  if (!format.ok()) return format.status();
  absl::StatusOr<LogLevel> level = ParseLogLevel(absl::GetFlag(FLAGS_log_level));
  if (!level.ok()) return level.status();
  return std::make_shared<LogWriter>(*format, *level, stderr);
}

}  // namespace kvbuffer::server
