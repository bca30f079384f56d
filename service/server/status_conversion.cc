#include "service/server/status_conversion.h"

#include <string>

namespace kvbuffer::server {

namespace {

// absl::StatusCode and grpc::StatusCode both follow google.rpc.Code; anything outside it is
// reported as UNKNOWN rather than passed through.
int WireCode(absl::StatusCode code) {
  const int c = static_cast<int>(code);
  return (c >= 0 && c <= 16) ? c : static_cast<int>(absl::StatusCode::kUnknown);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(WireCode(s.code())), std::string(s.message()));
}

void SetStreamStatus(const absl::Status& s, v1::StreamResponse* response) {
  response->set_status_code(WireCode(s.code()));
  if (s.ok()) {
    response->clear_status_message();
  } else {
    response->set_status_message(std::string(s.message()));
  }
}

}  // namespace kvbuffer::server
