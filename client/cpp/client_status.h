// Wire statuses (gRPC, and the per-call status of a Stream response) as absl::Status: the one
// place the client converts them.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::client {

// The absl::Status with the same code and message as `s`.
absl::Status FromGrpcStatus(const grpc::Status& s);

// The status a Stream response carries for its call.
absl::Status FromStreamResponse(const v1::StreamResponse& response);

// Whether a call that failed with `code` may be sent again unchanged (positions make it safe).
bool IsRetryable(absl::StatusCode code);

}  // namespace kvbuffer::client
