#include "tests/integration/wire_driver.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/cpp/client_status.h"

namespace kvbuffer::testing {

WireDriver::WireDriver(const std::string& address, const std::string& mode, uint64_t seed,
                       const client::ClientOptions& options)
    : mode_(mode), seed_(seed), client_(client::Client::Connect(address, options)) {
  transport_ = mode == "stream" ? mock::MakeStreamTransport(client_.get(), 4, absl::Minutes(10))
                                : mock::MakeUnaryTransport(client_.get());
}

absl::Status WireDriver::Init() {
  absl::StatusOr<v1::GetServerInfoResponse> info = client_->GetServerInfo();
  if (!info.ok()) return info.status();
  const v1::ModelShapes& m = info->model();
  config_.name = m.name();
  config_.num_layers = m.num_layers();
  config_.num_k_heads = m.num_k_heads();
  config_.num_v_heads = m.num_v_heads();
  config_.head_k_dim = m.head_k_dim();
  config_.head_v_dim = m.head_v_dim();
  config_.conv_width = m.conv_width();
  config_.param_seed = m.param_seed();
  params_ = MakeAllLayerParams(config_);
  calls_ = std::make_unique<mock::LayerCalls>(config_, DType::kBFloat16, DType::kFloat32, seed_);
  return absl::OkStatus();
}

mock::CheckedSequence* WireDriver::NewSequence(uint64_t id) {
  sequences_.push_back(std::make_unique<mock::CheckedSequence>(id, config_, &params_));
  return sequences_.back().get();
}

v1::StreamResponse WireDriver::Run(v1::StreamRequest call) {
  v1::StreamResponse response;
  v1::StreamRequest* calls[] = {&call};
  v1::StreamResponse* responses[] = {&response};
  absl::Status s = transport_->Run(calls, responses);
  if (!s.ok()) {
    response.set_status_code(static_cast<int>(absl::StatusCode::kInternal));
    response.set_status_message(absl::StrCat("transport failed: ", s.ToString()));
  }
  return response;
}

absl::Status WireDriver::Open(const Seqs& seqs) {
  v1::StreamRequest call;
  for (auto* s : seqs) call.mutable_open_sequences()->add_ids(s->id());
  return client::FromStreamResponse(Run(std::move(call)));
}

absl::Status WireDriver::Close(const Seqs& seqs) {
  v1::StreamRequest call;
  for (auto* s : seqs) call.mutable_close_sequences()->add_ids(s->id());
  return client::FromStreamResponse(Run(std::move(call)));
}

absl::Status WireDriver::Flush(const Seqs& seqs) {
  v1::StreamRequest call;
  for (auto* s : seqs) call.mutable_flush()->add_ids(s->id());
  return client::FromStreamResponse(Run(std::move(call)));
}

absl::Status WireDriver::CheckOutputs(mock::LayerKind kind, int32_t layer, const Seqs& seqs,
                                      const std::vector<int32_t>& tokens,
                                      const v1::LayerOutput& output) {
  std::vector<double> errors;
  if (absl::Status s = calls_->Check(kind, layer, seqs, tokens, output, &errors); !s.ok()) {
    return s;
  }
  for (size_t i = 0; i < errors.size(); ++i) {
    max_error_ = std::max(max_error_, std::isnan(errors[i]) ? INFINITY : errors[i]);
    if (!(errors[i] <= tolerance)) {
      return absl::InternalError(absl::StrCat(mock::LayerKindName(kind), " layer ", layer,
                                              " sequence ", seqs[i]->id(), ": relative error ",
                                              errors[i], " > ", tolerance));
    }
  }
  return absl::OkStatus();
}

absl::Status WireDriver::CheckDecodeAnswer(int32_t layer, const Seqs& seqs,
                                           const v1::LayerOutput& output) {
  return CheckOutputs(mock::LayerKind::kDecode, layer, seqs, std::vector<int32_t>(seqs.size(), 1),
                      output);
}

template <typename Request>
absl::Status WireDriver::LayerStep(mock::LayerKind kind, const Seqs& seqs,
                                   const std::vector<int32_t>& tokens,
                                   Request* (v1::StreamRequest::*mutable_request)()) {
  for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
    v1::StreamRequest call;
    calls_->Fill(layer, seqs, tokens, (call.*mutable_request)());
    v1::StreamResponse response = Run(std::move(call));
    if (absl::Status s = client::FromStreamResponse(response); !s.ok()) return s;
    if (absl::Status s = CheckOutputs(kind, layer, seqs, tokens, response.layer_output());
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status WireDriver::Prefill(const Seqs& seqs, const std::vector<int32_t>& tokens) {
  return LayerStep(mock::LayerKind::kPrefill, seqs, tokens, &v1::StreamRequest::mutable_prefill);
}

absl::Status WireDriver::Decode(const Seqs& seqs) {
  return LayerStep(mock::LayerKind::kDecode, seqs, std::vector<int32_t>(seqs.size(), 1),
                   &v1::StreamRequest::mutable_decode_step);
}

absl::Status WireDriver::Verify(const Seqs& seqs, const std::vector<int32_t>& drafts) {
  return LayerStep(mock::LayerKind::kVerify, seqs, drafts,
                   &v1::StreamRequest::mutable_verify_drafts);
}

absl::Status WireDriver::Commit(const Seqs& seqs, const std::vector<int32_t>& accepted) {
  v1::StreamRequest call;
  for (size_t i = 0; i < seqs.size(); ++i) {
    v1::CommitItem* item = call.mutable_commit_drafts()->add_items();
    item->set_id(seqs[i]->id());
    item->set_position(seqs[i]->position(0));
    item->set_accepted(accepted[i]);
  }
  absl::Status s = client::FromStreamResponse(Run(std::move(call)));
  if (!s.ok()) return s;
  for (size_t i = 0; i < seqs.size(); ++i) seqs[i]->CommitDrafts(accepted[i]);
  return absl::OkStatus();
}

v1::StreamRequest WireDriver::DecodeCall(int32_t layer, const Seqs& seqs) {
  v1::StreamRequest call;
  calls_->Fill(layer, seqs, std::vector<int32_t>(seqs.size(), 1), call.mutable_decode_step());
  return call;
}

}  // namespace kvbuffer::testing
