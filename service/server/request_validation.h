// Structural validation of every AttentionService request before it reaches the engine: each
// field is checked against the served model and the server's limits, and a failure is
// INVALID_ARGUMENT naming the field by its path (e.g. "sequences[2].num_tokens") with the value
// expected and the value got. Sequence state (open, positions, drafts, pools) is the engine's.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kvbuffer/v1/attention_service.pb.h"
#include "service/engine/backend.h"
#include "service/engine/engine.h"
#include "service/engine/engine_options.h"

namespace kvbuffer::server {

// What a request may ask, derived from the engine's settings.
struct RequestLimits {
  int32_t num_layers = 1;
  int32_t channels = 1;     // width of one qkv row
  int32_t num_v_heads = 1;  // width of one a or b row
  int32_t max_drafts = 1;
  int32_t max_ids = 1;                   // sequences one call may name (the sequence table's size)
  int32_t max_prefill_tokens = 1 << 24;  // per sequence in one Prefill
  int32_t max_capacity_queries = 64;
  int64_t max_capacity_length = int64_t{1} << 40;
};

// The limits of an engine configured with `options`.
RequestLimits LimitsFor(const EngineOptions& options);

// Checks a GetServerInfo request (capacity_queries count, lengths and draft widths).
absl::Status ValidateGetServerInfo(const v1::GetServerInfoRequest& request,
                                   const RequestLimits& limits);

// Checks the id list of OpenSequences, CloseSequences or Flush (`rpc` names the call): not empty,
// at most limits.max_ids entries (for OpenSequences more is RESOURCE_EXHAUSTED, as a full table
// is), no id twice.
absl::Status ValidateIds(absl::string_view rpc,
                         const google::protobuf::RepeatedField<uint64_t>& ids,
                         const RequestLimits& limits);

// Checks a CommitDrafts request: items not empty and bounded, positions and accepted counts not
// negative, no sequence twice. (accepted above the drafts pending is the engine's OUT_OF_RANGE.)
absl::Status ValidateCommitDrafts(const v1::CommitDraftsRequest& request,
                                  const RequestLimits& limits);

// Checks a Prefill (kind kPrefill), DecodeStep (kDecode) or VerifyDrafts (kVerify) request:
// layer, sequences (count, ids, positions, num_tokens for the kind), the qkv, a and b tensors
// (present, known dtype shared by all three, shape [total_tokens, width], data size) and
// output_dtype; on success fills `call` (all but its tenant) with views borrowing the request's
// bytes, a DecodeStep num_tokens of 0 read as 1, and an unspecified output_dtype as qkv's.
absl::Status ValidateLayerRequest(StepKind kind, const v1::PrefillRequest& request,
                                  const RequestLimits& limits, LayerCall* call);
absl::Status ValidateLayerRequest(StepKind kind, const v1::DecodeStepRequest& request,
                                  const RequestLimits& limits, LayerCall* call);
absl::Status ValidateLayerRequest(StepKind kind, const v1::VerifyDraftsRequest& request,
                                  const RequestLimits& limits, LayerCall* call);

}  // namespace kvbuffer::server
