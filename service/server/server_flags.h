// Command-line flags of kvbuffer-server and their translation into engine and server settings.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service/engine/engine_options.h"
#include "service/server/backend_factory.h"
#include "service/server/kvbuffer_server.h"

namespace kvbuffer::server {

// Everything the flags decide.
struct ServerConfig {
  EngineOptions engine;
  ServerOptions server;
  BackendChoice backend;
  absl::Duration drain_grace;       // NOT_SERVING before the listener closes
  absl::Duration shutdown_timeout;  // in-flight calls get this long, then are cancelled
};

// Reads the (already parsed) flags; INVALID_ARGUMENT naming the flag when one is unusable.
// Engine settings are checked by ValidateEngineOptions as well.
absl::StatusOr<ServerConfig> ServerConfigFromFlags();

}  // namespace kvbuffer::server
