#include "service/server/request_log.h"

#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace kvbuffer::server {

namespace {

constexpr size_t kMaxRequestIdBytes = 128;

bool ValidRequestId(std::string_view id) {
  if (id.empty() || id.size() > kMaxRequestIdBytes) return false;
  for (char c : id) {
    if (c < 0x21 || c > 0x7E) return false;
  }
  return true;
}

template <typename LayerRequest>
CallCounts LayerCounts(const LayerRequest& request, bool one_token_default) {
  CallCounts c;
  c.sequences = request.sequences_size();
  for (const v1::SequenceTokens& s : request.sequences()) {
    c.tokens += (one_token_default && s.num_tokens() == 0) ? 1 : s.num_tokens();
  }
  return c;
}

}  // namespace

std::string NewRequestId() {
  thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    std::seed_seq seq{rd(), rd(), rd(), rd()};
    return std::mt19937_64(seq);
  }());
  return absl::StrFormat("%016x%016x", rng(), rng());
}

std::string RequestIdOf(const grpc::ServerContextBase& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find(kRequestIdMetadata);
  if (it != metadata.end()) {
    const std::string_view id(it->second.data(), it->second.size());
    if (ValidRequestId(id)) return std::string(id);
  }
  return NewRequestId();
}

CallCounts CountsOf(const v1::GetServerInfoRequest&) { return {}; }
CallCounts CountsOf(const v1::OpenSequencesRequest& r) { return {r.ids_size(), 0}; }
CallCounts CountsOf(const v1::CloseSequencesRequest& r) { return {r.ids_size(), 0}; }
CallCounts CountsOf(const v1::PrefillRequest& r) { return LayerCounts(r, false); }
CallCounts CountsOf(const v1::DecodeStepRequest& r) { return LayerCounts(r, true); }
CallCounts CountsOf(const v1::VerifyDraftsRequest& r) { return LayerCounts(r, false); }
CallCounts CountsOf(const v1::CommitDraftsRequest& r) {
  CallCounts c;
  c.sequences = r.items_size();
  for (const v1::CommitItem& item : r.items()) c.tokens += item.accepted();
  return c;
}
CallCounts CountsOf(const v1::FlushRequest& r) { return {r.ids_size(), 0}; }

CallCounts CountsOf(const v1::StreamRequest& r) {
  switch (r.call_case()) {
    case v1::StreamRequest::kGetServerInfo:
      return CountsOf(r.get_server_info());
    case v1::StreamRequest::kOpenSequences:
      return CountsOf(r.open_sequences());
    case v1::StreamRequest::kCloseSequences:
      return CountsOf(r.close_sequences());
    case v1::StreamRequest::kPrefill:
      return CountsOf(r.prefill());
    case v1::StreamRequest::kDecodeStep:
      return CountsOf(r.decode_step());
    case v1::StreamRequest::kVerifyDrafts:
      return CountsOf(r.verify_drafts());
    case v1::StreamRequest::kCommitDrafts:
      return CountsOf(r.commit_drafts());
    case v1::StreamRequest::kFlush:
      return CountsOf(r.flush());
    case v1::StreamRequest::CALL_NOT_SET:
      break;
  }
  return {};
}

std::string_view StreamCallName(const v1::StreamRequest& r) {
  switch (r.call_case()) {
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
      break;
  }
  return "";
}

RequestLog::RequestLog(std::shared_ptr<LogWriter> writer) : writer_(std::move(writer)) {}

std::string RequestLog::BeginCall(grpc::ServerContextBase* context) const {
  std::string id = RequestIdOf(*context);
  context->AddInitialMetadata(kRequestIdMetadata, id);
  return id;
}

void RequestLog::Log(const CallRecord& r) const {
  const auto code = static_cast<absl::StatusCode>(r.code);
  LogLevel level = LogLevel::kWarning;
  if (code == absl::StatusCode::kOk) {
    level = LogLevel::kInfo;
  } else if (code == absl::StatusCode::kInternal || code == absl::StatusCode::kUnknown ||
             code == absl::StatusCode::kDataLoss || code == absl::StatusCode::kUnimplemented) {
    level = LogLevel::kError;
  }
  if (!writer_->Enabled(level)) return;
  std::vector<LogField> fields;
  fields.reserve(14);
  fields.emplace_back("request_id", r.request_id);
  if (r.stream_request_id.has_value()) {
    fields.emplace_back("stream_request_id", *r.stream_request_id);
  }
  fields.emplace_back("rpc", r.rpc);
  if (!r.tenant.empty()) fields.emplace_back("tenant", r.tenant);
  fields.emplace_back("peer", r.peer);
  fields.emplace_back("status", absl::StatusCodeToString(code));
  fields.emplace_back("latency_ms", r.latency_seconds * 1e3);
  if (r.stream_messages >= 0) fields.emplace_back("messages", r.stream_messages);
  fields.emplace_back("sequences", r.counts.sequences);
  fields.emplace_back("tokens", r.counts.tokens);
  fields.emplace_back("request_bytes", r.request_bytes);
  fields.emplace_back("response_bytes", r.response_bytes);
  writer_->Log(level, r.stream_request_id.has_value() ? "stream_message" : "rpc", fields);
}

}  // namespace kvbuffer::server
