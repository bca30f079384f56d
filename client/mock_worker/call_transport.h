// How the mock worker's calls reach the server: one unary RPC per call, or all of them in order
// on one Stream (pipelined up to a window). Calls and answers use the Stream envelope in both
// modes, so the worker is written once.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/mock_worker/latency_recorder.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::mock {

class CallTransport {
 public:
  virtual ~CallTransport() = default;

  // Runs `calls` in order; responses[i] receives call i's answer with its status in
  // status_code/status_message. An error return means the transport itself failed.
  virtual absl::Status Run(absl::Span<v1::StreamRequest* const> calls,
                           absl::Span<v1::StreamResponse* const> responses) = 0;

  // Ends the transport cleanly (closes the stream); OK for unary.
  virtual absl::Status Close() = 0;

  // Latency of every call made, per RPC name.
  const LatencyRecorder& latencies() const { return latencies_; }

 protected:
  LatencyRecorder latencies_;
};

// The RPC name of a call ("Prefill", "DecodeStep", ...).
absl::string_view CallName(const v1::StreamRequest& call);

// One unary RPC per call, with the client's deadlines and retries.
std::unique_ptr<CallTransport> MakeUnaryTransport(client::Client* client);

// One Stream for all calls; up to `window` calls are sent ahead of their answers.
std::unique_ptr<CallTransport> MakeStreamTransport(client::Client* client, int window,
                                                   absl::Duration stream_timeout);

}  // namespace kvbuffer::mock
