#include "client/mock_worker/call_transport.h"

#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/mock_worker/unary_dispatch.h"
#include "client/cpp/client_status.h"

namespace kvbuffer::mock {

absl::string_view CallName(const v1::StreamRequest& call) {
  switch (call.call_case()) {
    case v1::StreamRequest::kGetServerInfo:
      return "GetServerInfo";
    case v1::StreamRequest::kOpenSequences:
      return "OpenSequences";
    case v1::StreamRequest::kCloseSequences:
      return "CloseSequences";
    case v1::StreamRequest::kPrefill:
      return "Prefill";
    case v1::StreamRequest::kDecodeStep:
      return "DecodeStep";
    case v1::StreamRequest::kVerifyDrafts:
      return "VerifyDrafts";
    case v1::StreamRequest::kCommitDrafts:
      return "CommitDrafts";
    case v1::StreamRequest::kFlush:
      return "Flush";
    case v1::StreamRequest::CALL_NOT_SET:
      return "(none)";
  }
  return "(unknown)";
}

namespace {

class UnaryTransport final : public CallTransport {
 public:
  explicit UnaryTransport(client::Client* client) : client_(client) {}

  absl::Status Run(absl::Span<v1::StreamRequest* const> calls,
                   absl::Span<v1::StreamResponse* const> responses) override {
    for (size_t i = 0; i < calls.size(); ++i) {
      const v1::StreamRequest& c = *calls[i];
      v1::StreamResponse* r = responses[i];
      const absl::Time start = absl::Now();
      DispatchUnary(client_, c, r);
      latencies_.Record(CallName(c), absl::Now() - start);
    }
    return absl::OkStatus();
  }

  absl::Status Close() override { return absl::OkStatus(); }

 private:
  client::Client* client_;
};

class StreamTransport final : public CallTransport {
 public:
  StreamTransport(client::Client* client, int window, absl::Duration timeout)
      : session_(client->OpenStream(timeout)), window_(window < 1 ? 1 : window) {}

  absl::Status Run(absl::Span<v1::StreamRequest* const> calls,
                   absl::Span<v1::StreamResponse* const> responses) override {
    std::deque<absl::Time> sent;  // send times of unanswered calls, oldest first
    size_t received = 0;
    auto receive_one = [&]() -> absl::Status {
      v1::StreamResponse* r = responses[received];
      if (absl::Status s = session_->Receive(r); !s.ok()) return s;
      latencies_.Record(CallName(*calls[received]), absl::Now() - sent.front());
      sent.pop_front();
      ++received;
      return absl::OkStatus();
    };
    for (v1::StreamRequest* c : calls) {
      if (static_cast<int>(sent.size()) >= window_) {
        if (absl::Status s = receive_one(); !s.ok()) return s;
      }
      sent.push_back(absl::Now());
      absl::StatusOr<uint64_t> id = session_->Send(c);
      if (!id.ok()) {
        // The stream ended: its final status (read after the answers still due) says why.
        v1::StreamResponse drained;
        absl::Status why;
        while ((why = session_->Receive(&drained)).ok()) {
        }
        return why.code() == absl::StatusCode::kFailedPrecondition ? id.status() : why;
      }
    }
    while (received < calls.size()) {
      if (absl::Status s = receive_one(); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status Close() override { return session_->Close(); }

 private:
  std::unique_ptr<client::StreamSession> session_;
  int window_;
};

}  // namespace

std::unique_ptr<CallTransport> MakeUnaryTransport(client::Client* client) {
  return std::make_unique<UnaryTransport>(client);
}

std::unique_ptr<CallTransport> MakeStreamTransport(client::Client* client, int window,
                                                   absl::Duration stream_timeout) {
  return std::make_unique<StreamTransport>(client, window, stream_timeout);
}

}  // namespace kvbuffer::mock
