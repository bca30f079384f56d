#include "client/cpp/client_status.h"

namespace kvbuffer::client {

namespace {

absl::StatusCode Code(int code) {
  return (code >= 0 && code <= 16) ? static_cast<absl::StatusCode>(code)
                                   : absl::StatusCode::kUnknown;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(Code(static_cast<int>(s.error_code())), s.error_message());
}

absl::Status FromStreamResponse(const v1::StreamResponse& response) {
  if (response.status_code() == 0) return absl::OkStatus();
  return absl::Status(Code(response.status_code()), response.status_message());
}

bool IsRetryable(absl::StatusCode code) {
  return code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded;
}

}  // namespace kvbuffer::client
