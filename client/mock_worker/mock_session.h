// A mock model worker session: worker threads that each play a Qwen3-Next-shaped model against a
// server (shapes and layer parameters from GetServerInfo), opening, prefilling, decoding,
// verifying drafts, committing, flushing and closing sequences, and checking every output against
// their own fp64 oracle. Used by kvbuffer-mock-worker and by the integration tests.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cpp/client_credentials.h"
#include "client/mock_worker/latency_recorder.h"
#include "kernels/reference/dtype.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::mock {

struct MockSessionOptions {
  std::string server = "127.0.0.1:50051";
  // Replicas ("host:port,host:port" or "dns:///name:port"): when set, every call is routed by
  // sequence id over them (client/cpp/routed_client.h; unary mode only) and `server` is unused.
  std::string servers;
  std::string mode = "unary";  // "unary" or "stream"
  int32_t concurrency = 2;     // worker threads, each with its own sequences
  int32_t sequences = 0;       // per worker over the session; 0: by model size
  int32_t batch = 4;           // sequences a worker keeps open at once
  int32_t steps = 0;           // most decode/verify steps of one sequence; 0: by model size
  int32_t max_prompt = 0;      // longest prompt; 0: by model size
  int32_t layers = 0;          // the first N layers are played; 0: all (draft windows need all,
                               // since CommitDrafts acts on every layer)
  uint64_t seed = 1;
  double tolerance = 0;          // relative error allowed per call and sequence; 0: by backend
  double verify_fraction = 0.4;  // share of steps that verify a draft window
  int32_t max_drafts = 4;        // drafts per window at most (and the server's max_drafts)
  int32_t flush_every = 5;       // every N-th step flushes a random half of the open sequences
  DType input_dtype = DType::kBFloat16;
  DType output_dtype = DType::kFloat32;
  int32_t stream_window = 8;  // calls in flight on a Stream
  absl::Duration call_timeout = absl::Seconds(120);
  absl::Duration wait_for_server = absl::Seconds(10);
  uint64_t id_base = 0;      // first sequence id; 0: derived from the seed
  int32_t rounds = 0;        // model steps per worker, admitting new sequences as others end, then
                             // every open sequence is closed; 0: play `sequences` to their ends
  client::TlsOptions tls;    // plaintext unless tls.enabled
  std::string bearer_token;  // sent with every API call when not empty
};

struct MockSessionReport {
  // What was asked and what the server is.
  MockSessionOptions options;
  v1::GetServerInfoResponse info_before;
  v1::GetServerInfoResponse info_after;
  int32_t layers_played = 0;
  double tolerance = 0;
  // Work done.
  int64_t sequences = 0;
  int64_t short_prompts = 0;  // prompts under the stateless limit
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  int64_t drafts_verified = 0;
  int64_t drafts_accepted = 0;
  int64_t flushes = 0;
  int64_t replayed_answers = 0;
  int64_t checks = 0;  // outputs compared (per call, layer and sequence)
  LatencyRecorder latencies;
  absl::Duration wall;
  // Verdict.
  double max_relative_error = 0;
  int64_t mismatches = 0;
  std::string first_mismatch;
  std::string first_error;  // an RPC that failed, or a malformed answer

  bool ok() const { return mismatches == 0 && first_error.empty(); }
};

// Runs a session; an error only when the server cannot be reached or described. Mismatches and
// failed calls are in the report (ok() false).
absl::StatusOr<MockSessionReport> RunMockSession(const MockSessionOptions& options);

}  // namespace kvbuffer::mock
