#include "service/parallel/tp_rank.h"

#include "absl/strings/str_cat.h"
#include "service/parallel/head_shard.h"

namespace kvbuffer::parallel {

absl::Status RankExecutor::Allocate(const ModelConfig& config,
                                    const std::vector<LayerParams>& shard_params,
                                    const PoolSizes& sizes) {
  absl::StatusOr<HeadShard> shard =
      MakeHeadShard(config, transport_->rank(), transport_->world_size());
  if (!shard.ok()) return shard.status();
  shard_ = ShardModelConfig(config, *shard);
  return compute_->Allocate(shard_, shard_params, sizes);
}

absl::Status RankExecutor::RunLocal(const CommandHeader& h, const MetaView& meta,
                                    const void* inputs, void* payload) {
  Backend& backend = compute_->backend();
  switch (static_cast<TpOp>(h.op)) {
    case TpOp::kNoop:
      return absl::OkStatus();
    case TpOp::kStep: {
      LayerStep step;
      step.layer = h.layer;
      step.kind = static_cast<StepKind>(h.kind);
      step.items = meta.step_items;
      step.page_table = meta.ints;
      step.in_dtype = static_cast<DType>(h.in_dtype);
      step.out_dtype = static_cast<DType>(h.out_dtype);
      step.total_tokens = h.total_tokens;
      if (h.input_bytes > 0) {
        const StepInputLayout l = ComputeStepInputLayout(shard_, h.total_tokens, step.in_dtype);
        const uint8_t* in = static_cast<const uint8_t*>(inputs);
        step.qkv = in + l.qkv;
        step.a = in + l.a;
        step.b = in + l.b;
        step.out = payload;
      }
      return compute_->RunStepInTransport(step, *transport_, options_->op_timeout);
    }
    case TpOp::kFold:
      return backend.FoldBuffers(h.layer, meta.fold_items, meta.ints);
    case TpOp::kCommitConv:
      return backend.CommitConv(h.layer, meta.conv_items);
    case TpOp::kResetConv:
      return backend.ResetConv(meta.ints);
    case TpOp::kReadState: {
      const size_t bytes = static_cast<size_t>(shard_.state_elems()) * sizeof(float);
      absl::StatusOr<void*> host = state_host_.Reserve(*transport_, bytes);
      if (!host.ok()) return host.status();
      if (absl::Status s = backend.ReadState(h.state_slot, h.layer, static_cast<float*>(*host));
          !s.ok()) {
        return s;
      }
      return transport_->CopyIn(payload, *host, bytes);
    }
    case TpOp::kAllocate:
    case TpOp::kShutdown:
      break;
  }
  return absl::InternalError(
      absl::StrCat("RankExecutor cannot run ", TpOpName(static_cast<TpOp>(h.op))));
}

}  // namespace kvbuffer::parallel
