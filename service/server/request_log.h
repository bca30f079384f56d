// The per-call log record of the server: every RPC, and every message of a Stream, is written as
// one structured line (json_log.h) with its request id, RPC, tenant, peer, status code name,
// latency, number of sequences and tokens, and request/response bytes. Only ids, counts and
// sizes are logged: never tensor contents or other sequence data.
//
// Request ids: a client may send "x-request-id" metadata (printable ASCII, at most 128 bytes);
// otherwise the server makes one. Either way it is echoed in the response's initial metadata.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "grpcpp/server_context.h"
#include "kvbuffer/v1/attention_service.pb.h"
#include "service/server/json_log.h"

namespace kvbuffer::server {

inline constexpr char kRequestIdMetadata[] = "x-request-id";

// A fresh request id: 32 lowercase hex digits (128 random bits).
std::string NewRequestId();

// The call's "x-request-id" metadata if present and valid (1..128 printable ASCII bytes), else a
// fresh id.
std::string RequestIdOf(const grpc::ServerContextBase& context);

// What a request names, for the log: sequences and tokens (never their data).
struct CallCounts {
  int64_t sequences = 0;
  int64_t tokens = 0;
};

// The counts of each request type (a Stream request: those of the call it carries).
CallCounts CountsOf(const v1::GetServerInfoRequest& request);
CallCounts CountsOf(const v1::OpenSequencesRequest& request);
CallCounts CountsOf(const v1::CloseSequencesRequest& request);
CallCounts CountsOf(const v1::PrefillRequest& request);
CallCounts CountsOf(const v1::DecodeStepRequest& request);
CallCounts CountsOf(const v1::VerifyDraftsRequest& request);
CallCounts CountsOf(const v1::CommitDraftsRequest& request);
CallCounts CountsOf(const v1::FlushRequest& request);
CallCounts CountsOf(const v1::StreamRequest& request);

// The RPC name of the call a Stream request carries ("" when none is set).
std::string_view StreamCallName(const v1::StreamRequest& request);

// One finished call (or one message of a Stream).
struct CallRecord {
  std::string_view request_id;
  std::string_view rpc;     // "Prefill", ..., "Stream"
  std::string_view tenant;  // "" when authentication is off (then not logged)
  std::string_view peer;    // gRPC's peer string, e.g. "ipv4:127.0.0.1:40000"
  int code = 0;             // google.rpc.Code
  double latency_seconds = 0;
  CallCounts counts;
  int64_t request_bytes = 0;
  int64_t response_bytes = 0;
  std::optional<uint64_t> stream_request_id;  // set for a message of a Stream
  int64_t stream_messages = -1;               // >= 0: a whole Stream's messages
};

class RequestLog {
 public:
  // Writes call records through `writer`.
  explicit RequestLog(std::shared_ptr<LogWriter> writer);

  // Gives the call its request id (RequestIdOf) and echoes it in the initial metadata; call it on
  // the thread that started the call, before anything is sent.
  std::string BeginCall(grpc::ServerContextBase* context) const;

  // Writes `record` as event "rpc" (a whole call) or "stream_message"; level info when OK,
  // error for INTERNAL, UNKNOWN, DATA_LOSS and UNIMPLEMENTED, warning otherwise.
  void Log(const CallRecord& record) const;

  LogWriter* writer() const { return writer_.get(); }

 private:
  std::shared_ptr<LogWriter> writer_;
};

}  // namespace kvbuffer::server
