// One StreamRequest sent as the matching unary call, through any client with the unary API
// (client::Client, client::RoutedClient), so the unary and routed transports share one dispatch.
#pragma once

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::mock {

// Sends `c` as its unary call on `client` and fills `r` (request_id, result, status_code and
// status_message); never fails itself: the call's status goes into `r`.
template <typename ClientT>
void DispatchUnary(ClientT* client, const v1::StreamRequest& c, v1::StreamResponse* r) {
  r->Clear();
  r->set_request_id(c.request_id());
  absl::Status s;
  switch (c.call_case()) {
    case v1::StreamRequest::kGetServerInfo: {
      absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo(c.get_server_info());
      s = info.status();
      if (info.ok()) *r->mutable_get_server_info() = std::move(*info);
      break;
    }
    case v1::StreamRequest::kOpenSequences:
      s = client->OpenSequences(c.open_sequences().ids());
      break;
    case v1::StreamRequest::kCloseSequences:
      s = client->CloseSequences(c.close_sequences().ids());
      break;
    case v1::StreamRequest::kPrefill:
      s = client->Prefill(c.prefill(), r->mutable_layer_output());
      break;
    case v1::StreamRequest::kDecodeStep:
      s = client->DecodeStep(c.decode_step(), r->mutable_layer_output());
      break;
    case v1::StreamRequest::kVerifyDrafts:
      s = client->VerifyDrafts(c.verify_drafts(), r->mutable_layer_output());
      break;
    case v1::StreamRequest::kCommitDrafts:
      s = client->CommitDrafts(c.commit_drafts());
      break;
    case v1::StreamRequest::kFlush:
      s = client->Flush(c.flush().ids());
      break;
    case v1::StreamRequest::CALL_NOT_SET:
      s = absl::InvalidArgumentError("call not set");
      break;
  }
  r->set_status_code(static_cast<int>(s.code()));
  r->set_status_message(std::string(s.message()));
}

}  // namespace kvbuffer::mock
