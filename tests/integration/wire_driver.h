// Drives a few checked sequences over the wire, unary or on a Stream, one call at a time: valid
// steps are checked against each sequence's fp64 oracle; any call can be built, corrupted and
// sent to observe the server's error.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/mock_worker/call_transport.h"
#include "client/mock_worker/checked_sequence.h"
#include "client/mock_worker/layer_calls.h"

namespace kvbuffer::testing {

using Seqs = std::vector<mock::CheckedSequence*>;

class WireDriver {
 public:
  // Connects to `address`; `mode` is "unary" or "stream"; `options` carry TLS and the token.
  WireDriver(const std::string& address, const std::string& mode, uint64_t seed = 1,
             const client::ClientOptions& options = {});

  // Reads the server's model and rebuilds its layer parameters.
  absl::Status Init();

  // A new checked sequence (not opened).
  mock::CheckedSequence* NewSequence(uint64_t id);

  // Sends one call and returns its answer (the call's status in status_code/status_message).
  v1::StreamResponse Run(v1::StreamRequest call);

  // Valid calls, all layers in order, every output checked (error beyond `tolerance` is an
  // INTERNAL status). The first failing call's status is returned; nothing advances then.
  absl::Status Open(const Seqs& seqs);
  absl::Status Close(const Seqs& seqs);
  absl::Status Prefill(const Seqs& seqs, const std::vector<int32_t>& tokens);
  absl::Status Decode(const Seqs& seqs);
  absl::Status Verify(const Seqs& seqs, const std::vector<int32_t>& drafts);
  absl::Status Commit(const Seqs& seqs, const std::vector<int32_t>& accepted);
  absl::Status Flush(const Seqs& seqs);

  // Ends the transport (closes the Stream; the status of that close).
  absl::Status CloseTransport() { return transport_->Close(); }

  // A valid DecodeStep call for `seqs` on `layer`, to be corrupted by a test (not checked).
  v1::StreamRequest DecodeCall(int32_t layer, const Seqs& seqs);

  // Checks `output`, the answer to the DecodeCall last made for `seqs` on `layer` (sent by the
  // test in any way, replayed or not), against the oracles, which advance; INTERNAL beyond
  // `tolerance`.
  absl::Status CheckDecodeAnswer(int32_t layer, const Seqs& seqs, const v1::LayerOutput& output);

  const ModelConfig& config() const { return config_; }
  client::Client* client() { return client_.get(); }
  double max_error() const { return max_error_; }
  double tolerance = 1e-5;

 private:
  absl::Status CheckOutputs(mock::LayerKind kind, int32_t layer, const Seqs& seqs,
                            const std::vector<int32_t>& tokens, const v1::LayerOutput& output);
  template <typename Request>
  absl::Status LayerStep(mock::LayerKind kind, const Seqs& seqs, const std::vector<int32_t>& tokens,
                         Request* (v1::StreamRequest::*mutable_request)());

  std::string mode_;
  uint64_t seed_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<mock::CallTransport> transport_;
  ModelConfig config_;
  std::vector<LayerParams> params_;
  std::unique_ptr<mock::LayerCalls> calls_;
  std::vector<std::unique_ptr<mock::CheckedSequence>> sequences_;
  double max_error_ = 0;
};

}  // namespace kvbuffer::testing
