// Service names the standard grpc.health.v1.Health service answers for.
#pragma once

namespace kvbuffer::server {

// SERVING while the process is up (a failing Check means restart it); also answered for "".
inline constexpr char kLivenessService[] = "liveness";
// SERVING while the server accepts new sequences; NOT_SERVING from the first shutdown signal on.
inline constexpr char kReadinessService[] = "readiness";
// Same as readiness, under the name of the service itself.
inline constexpr char kAttentionService[] = "kvbuffer.v1.AttentionService";

}  // namespace kvbuffer::server
