#include "client/mock_worker/layer_calls.h"

#include "absl/strings/str_cat.h"
#include "client/cpp/tensor_builder.h"

namespace kvbuffer::mock {

const char* LayerKindName(LayerKind kind) {
  switch (kind) {
    case LayerKind::kPrefill:
      return "Prefill";
    case LayerKind::kDecode:
      return "DecodeStep";
    case LayerKind::kVerify:
      return "VerifyDrafts";
  }
  return "?";
}

LayerCalls::LayerCalls(const ModelConfig& config, DType input_dtype, DType output_dtype,
                       uint64_t seed)
    : config_(config),
      input_dtype_(input_dtype),
      output_dtype_(output_dtype),
      rng_(config, input_dtype, seed),
      acts_(config.num_layers) {}

template <typename Request>
void LayerCalls::Fill(int32_t layer, absl::Span<CheckedSequence* const> seqs,
                      absl::Span<const int32_t> tokens, Request* request) {
  std::vector<Activations>& acts = acts_[layer];
  acts.resize(seqs.size());
  int64_t total = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    rng_.Generate(tokens[i], &acts[i]);
    total += tokens[i];
  }
  request->set_layer(layer);
  request->clear_sequences();
  for (size_t i = 0; i < seqs.size(); ++i) {
    v1::SequenceTokens* st = request->add_sequences();
    st->set_id(seqs[i]->id());
    st->set_position(seqs[i]->position(layer));
    st->set_num_tokens(tokens[i]);
  }
  qkv_.clear();
  a_.clear();
  b_.clear();
  for (const Activations& x : acts) {
    qkv_.insert(qkv_.end(), x.qkv.begin(), x.qkv.end());
    a_.insert(a_.end(), x.a.begin(), x.a.end());
    b_.insert(b_.end(), x.b.begin(), x.b.end());
  }
  const int64_t qkv_shape[] = {total, config_.channels()};
  const int64_t ab_shape[] = {total, config_.num_v_heads};
  client::SetTensor(qkv_, qkv_shape, input_dtype_, request->mutable_qkv());
  client::SetTensor(a_, ab_shape, input_dtype_, request->mutable_a());
  client::SetTensor(b_, ab_shape, input_dtype_, request->mutable_b());
  request->set_output_dtype(client::ToProtoDType(output_dtype_));
}

template void LayerCalls::Fill(int32_t, absl::Span<CheckedSequence* const>,
                               absl::Span<const int32_t>, v1::PrefillRequest*);
template void LayerCalls::Fill(int32_t, absl::Span<CheckedSequence* const>,
                               absl::Span<const int32_t>, v1::DecodeStepRequest*);
template void LayerCalls::Fill(int32_t, absl::Span<CheckedSequence* const>,
                               absl::Span<const int32_t>, v1::VerifyDraftsRequest*);

absl::Status LayerCalls::Check(LayerKind kind, int32_t layer,
                               absl::Span<CheckedSequence* const> seqs,
                               absl::Span<const int32_t> tokens, const v1::LayerOutput& out,
                               std::vector<double>* errors) {
  const char* rpc = LayerKindName(kind);
  int64_t total = 0;
  for (int32_t t : tokens) total += t;
  const int64_t hv = config_.num_v_heads, v = config_.head_v_dim;
  const v1::Tensor& t = out.output();
  if (t.dtype() != client::ToProtoDType(output_dtype_) || t.shape_size() != 3 ||
      t.shape(0) != total || t.shape(1) != hv || t.shape(2) != v) {
    return absl::InternalError(absl::StrCat(rpc, " layer ", layer, ": output is ",
                                            v1::DType_Name(t.dtype()), " with ", t.shape_size(),
                                            " dims, expected [", total, ", ", hv, ", ", v, "] ",
                                            v1::DType_Name(client::ToProtoDType(output_dtype_))));
  }
  if (absl::Status s = client::TensorToFloats(t, &got_); !s.ok()) return s;
  if (out.positions_size() != static_cast<int>(seqs.size())) {
    return absl::InternalError(absl::StrCat(rpc, " layer ", layer, ": ", out.positions_size(),
                                            " positions for ", seqs.size(), " sequences"));
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t before = seqs[i]->position(layer);
    const int64_t want = kind == LayerKind::kVerify ? before : before + tokens[i];
    if (out.positions(i) != want) {
      return absl::InternalError(absl::StrCat(rpc, " layer ", layer, ": sequence ", seqs[i]->id(),
                                              " reports position ", out.positions(i), ", expected ",
                                              want));
    }
  }
  errors->assign(seqs.size(), 0.0);
  size_t offset = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const float* g = got_.data() + offset;
    (*errors)[i] = kind == LayerKind::kVerify ? seqs[i]->CheckDrafts(layer, acts_[layer][i], g)
                                              : seqs[i]->CheckCommitted(layer, acts_[layer][i], g);
    offset += static_cast<size_t>(tokens[i]) * hv * v;
  }
  return absl::OkStatus();
}

}  // namespace kvbuffer::mock
