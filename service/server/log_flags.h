// The server's logging flags: --log_format (json, the default, or text) and --log_level (debug,
// info, warning, error). Apart from server_flags.cc so that logging stays one idea.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "service/server/json_log.h"

namespace kvbuffer::server {

// A log writer on stderr as --log_format and --log_level say; INVALID_ARGUMENT on a bad value.
absl::StatusOr<std::shared_ptr<LogWriter>> LogWriterFromFlags();

}  // namespace kvbuffer::server
