#include "client/mock_worker/routed_transport.h"

#include <string>
#include <utility>

#include "absl/time/clock.h"

namespace kvbuffer::mock {

namespace {

class RoutedTransport final : public CallTransport {
 public:
  explicit RoutedTransport(client::RoutedClient* client) : client_(client) {}

  absl::Status Run(absl::Span<v1::StreamRequest* const> calls,
                   absl::Span<v1::StreamResponse* const> responses) override {
    for (size_t i = 0; i < calls.size(); ++i) {
      const v1::StreamRequest& c = *calls[i];
      v1::StreamResponse* r = responses[i];
      r->Clear();
      r->set_request_id(c.request_id());
      const absl::Time start = absl::Now();
      absl::Status s;
      switch (c.call_case()) {
        case v1::StreamRequest::kGetServerInfo: {
          absl::StatusOr<v1::GetServerInfoResponse> info =
              client_->GetServerInfo(c.get_server_info());
          s = info.status();
          if (info.ok()) *r->mutable_get_server_info() = std::move(*info);
          break;
        }
        case v1::StreamRequest::kOpenSequences:
          s = client_->OpenSequences(c.open_sequences().ids());
          break;
        case v1::StreamRequest::kCloseSequences:
          s = client_->CloseSequences(c.close_sequences().ids());
          break;
        case v1::StreamRequest::kPrefill:
          s = client_->Prefill(c.prefill(), r->mutable_layer_output());
          break;
        case v1::StreamRequest::kDecodeStep:
          s = client_->DecodeStep(c.decode_step(), r->mutable_layer_output());
          break;
        case v1::StreamRequest::kVerifyDrafts:
          s = client_->VerifyDrafts(c.verify_drafts(), r->mutable_layer_output());
          break;
        case v1::StreamRequest::kCommitDrafts:
          s = client_->CommitDrafts(c.commit_drafts());
          break;
        case v1::StreamRequest::kFlush:
          s = client_->Flush(c.flush().ids());
          break;
        case v1::StreamRequest::CALL_NOT_SET:
          s = absl::InvalidArgumentError("call not set");
          break;
      }
      latencies_.Record(CallName(c), absl::Now() - start);
      r->set_status_code(static_cast<int>(s.code()));
      r->set_status_message(std::string(s.message()));
    }
    return absl::OkStatus();
  }

  absl::Status Close() override { return absl::OkStatus(); }

 private:
  client::RoutedClient* client_;
};

}  // namespace

std::unique_ptr<CallTransport> MakeRoutedTransport(client::RoutedClient* client) {
  return std::make_unique<RoutedTransport>(client);
}

}  // namespace kvbuffer::mock
