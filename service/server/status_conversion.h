// The one place where engine statuses (absl::Status) become wire statuses (gRPC codes).
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::server {

// Converts `s` to the gRPC status with the same code (the enums share values) and message.
grpc::Status ToGrpcStatus(const absl::Status& s);

// Writes `s` into a Stream response's status_code (a google.rpc.Code) and status_message.
void SetStreamStatus(const absl::Status& s, v1::StreamResponse* response);

}  // namespace kvbuffer::server
