#include "service/parallel/tp_protocol.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvbuffer::parallel {

const char* TpOpName(TpOp op) {
  switch (op) {
    case TpOp::kNoop:
      return "noop";
    case TpOp::kAllocate:
      return "allocate";
    case TpOp::kStep:
      return "step";
    case TpOp::kFold:
      return "fold";
    case TpOp::kCommitConv:
      return "commit_conv";
    case TpOp::kResetConv:
      return "reset_conv";
    case TpOp::kReadState:
      return "read_state";
    case TpOp::kShutdown:
      return "shutdown";
  }
  return "unknown";
}

StepInputLayout ComputeStepInputLayout(const ModelConfig& shard, int64_t tokens, DType dtype) {
  const size_t es = DTypeSize(dtype);
  const size_t T = static_cast<size_t>(std::max<int64_t>(tokens, 0));
  StepInputLayout l;
  l.qkv = 0;
  l.a = TpAlign(T * shard.channels() * es);
  l.b = l.a + TpAlign(T * shard.num_v_heads * es);
  l.total = l.b + TpAlign(T * shard.num_v_heads * es);
  return l;
}

size_t StepOutputBytes(const ModelConfig& shard, int64_t tokens, DType dtype) {
  return TpAlign(static_cast<size_t>(std::max<int64_t>(tokens, 0)) * shard.out_elems() *
                 DTypeSize(dtype));
}

namespace {

size_t LayerParamFloats(const ModelConfig& shard) {
  return static_cast<size_t>(shard.channels()) * shard.conv_width + 2 * shard.num_v_heads;
}

}  // namespace

size_t ParamBytes(const ModelConfig& shard) {
  return TpAlign(LayerParamFloats(shard) * shard.num_layers * sizeof(float));
}

void PackParams(const ModelConfig& shard, const std::vector<LayerParams>& params, void* dst) {
  float* p = static_cast<float*>(dst);
  for (const LayerParams& l : params) {
    p = std::copy(l.conv_weight.begin(), l.conv_weight.end(), p);
    p = std::copy(l.a_log.begin(), l.a_log.end(), p);
    p = std::copy(l.dt_bias.begin(), l.dt_bias.end(), p);
  }
  const size_t used = LayerParamFloats(shard) * params.size() * sizeof(float);
  std::memset(static_cast<uint8_t*>(dst) + used, 0, ParamBytes(shard) - used);
}

std::vector<LayerParams> UnpackParams(const ModelConfig& shard, const void* src) {
  const float* p = static_cast<const float*>(src);
  const size_t conv = static_cast<size_t>(shard.channels()) * shard.conv_width;
  std::vector<LayerParams> out(shard.num_layers);
  for (LayerParams& l : out) {
    l.conv_weight.assign(p, p + conv);
    p += conv;
    l.a_log.assign(p, p + shard.num_v_heads);
    p += shard.num_v_heads;
    l.dt_bias.assign(p, p + shard.num_v_heads);
    p += shard.num_v_heads;
  }
  return out;
}

void PutModel(const ModelConfig& c, const PoolSizes& s, CommandHeader* h) {
  h->model[0] = c.num_layers;
  h->model[1] = c.num_k_heads;
  h->model[2] = c.num_v_heads;
  h->model[3] = c.head_k_dim;
  h->model[4] = c.head_v_dim;
  h->model[5] = c.conv_width;
  h->param_seed = c.param_seed;
  std::memset(h->model_name, 0, sizeof(h->model_name));
  std::memcpy(h->model_name, c.name.data(), std::min(c.name.size(), sizeof(h->model_name) - 1));
  h->pools[0] = s.state_slots;
  h->pools[1] = s.buffer_pages;
  h->pools[2] = s.page_tokens;
  h->pools[3] = s.conv_slots;
  h->pools[4] = s.max_drafts;
  h->pools[5] = static_cast<int32_t>(s.buffer_dtype);
  h->pools[6] = static_cast<int32_t>(s.conv_dtype);
}

void GetModel(const CommandHeader& h, ModelConfig* c, PoolSizes* s) {
  c->num_layers = h.model[0];
  c->num_k_heads = h.model[1];
  c->num_v_heads = h.model[2];
  c->head_k_dim = h.model[3];
  c->head_v_dim = h.model[4];
  c->conv_width = h.model[5];
  c->param_seed = h.param_seed;
  c->name.assign(h.model_name, strnlen(h.model_name, sizeof(h.model_name)));
  s->state_slots = h.pools[0];
  s->buffer_pages = h.pools[1];
  s->page_tokens = h.pools[2];
  s->conv_slots = h.pools[3];
  s->max_drafts = h.pools[4];
  s->buffer_dtype = static_cast<DType>(h.pools[5]);
  s->conv_dtype = static_cast<DType>(h.pools[6]);
}

absl::Status CheckHeader(const CommandHeader& h) {
  if (h.magic != kTpMagic) {
    return absl::InternalError(
        absl::StrCat("tensor-parallel command has magic ", h.magic, ", expected ", kTpMagic));
  }
  if (h.layout != kTpLayout) {
    return absl::InternalError(absl::StrCat("tensor-parallel ranks run different builds (layout ",
                                            h.layout, " vs ", kTpLayout, ")"));
  }
  if (h.op > static_cast<uint32_t>(TpOp::kShutdown) || h.meta_bytes < 0 || h.input_bytes < 0 ||
      h.output_bytes < 0 || h.num_items < 0 || h.page_table_len < 0 || h.next_block_bytes < 0 ||
      h.next_block_bytes > kMaxTpBlockBytes) {
    return absl::InternalError(absl::StrCat("malformed tensor-parallel command (op ", h.op, ")"));
  }
  return absl::OkStatus();
}

size_t StepMetaBytes(size_t items, size_t pages) {
  return items * sizeof(StepItem) + pages * sizeof(int32_t);
}

void PackStepMeta(std::span<const StepItem> items, std::span<const int32_t> pages, void* dst) {
  uint8_t* p = static_cast<uint8_t*>(dst);
  if (!items.empty()) std::memcpy(p, items.data(), items.size_bytes());
  if (!pages.empty()) std::memcpy(p + items.size_bytes(), pages.data(), pages.size_bytes());
}

size_t FoldMetaBytes(size_t items, size_t pages) {
  return items * sizeof(FoldItem) + pages * sizeof(int32_t);
}

void PackFoldMeta(std::span<const FoldItem> items, std::span<const int32_t> pages, void* dst) {
  uint8_t* p = static_cast<uint8_t*>(dst);
  if (!items.empty()) std::memcpy(p, items.data(), items.size_bytes());
  if (!pages.empty()) std::memcpy(p + items.size_bytes(), pages.data(), pages.size_bytes());
}

namespace {

template <typename T>
void Take(const uint8_t*& p, size_t n, std::vector<T>* out) {
  out->resize(n);
  if (n > 0) std::memcpy(out->data(), p, n * sizeof(T));
  p += n * sizeof(T);
}

}  // namespace

absl::Status DecodeMeta(const CommandHeader& h, const void* src, DecodedMeta* out) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  const size_t n = static_cast<size_t>(h.num_items);
  const size_t pages = static_cast<size_t>(h.page_table_len);
  size_t want = 0;
  switch (static_cast<TpOp>(h.op)) {
    case TpOp::kStep:
      want = StepMetaBytes(n, pages);
      break;
    case TpOp::kFold:
      want = FoldMetaBytes(n, pages);
      break;
    case TpOp::kCommitConv:
      want = n * sizeof(ConvCommitItem);
      break;
    case TpOp::kResetConv:
      want = n * sizeof(int32_t);
      break;
    default:
      want = 0;
      break;
  }
  if (want != static_cast<size_t>(h.meta_bytes)) {
    return absl::InternalError(absl::StrCat("tensor-parallel ", TpOpName(static_cast<TpOp>(h.op)),
                                            " command carries ", h.meta_bytes,
                                            " metadata bytes, expected ", want));
  }
  switch (static_cast<TpOp>(h.op)) {
    case TpOp::kStep:
      Take(p, n, &out->step_items);
      Take(p, pages, &out->ints);
      break;
    case TpOp::kFold:
      Take(p, n, &out->fold_items);
      Take(p, pages, &out->ints);
      break;
    case TpOp::kCommitConv:
      Take(p, n, &out->conv_items);
      break;
    case TpOp::kResetConv:
      Take(p, n, &out->ints);
      break;
    default:
      break;
  }
  return absl::OkStatus();
}

void PutStatus(const absl::Status& s, int32_t rank, uint64_t sequence, const BackendMemory& m,
               RankStatus* out) {
  *out = RankStatus{};
  out->code = static_cast<int32_t>(s.code());
  out->rank = rank;
  out->sequence = sequence;
  out->pool_bytes = m.pool_bytes;
  out->device_total_bytes = m.device_total_bytes;
  out->device_free_bytes = m.device_free_bytes;
  const size_t n = std::min(s.message().size(), sizeof(out->message) - 1);
  if (n > 0) std::memcpy(out->message, s.message().data(), n);
}

absl::Status GetStatus(const RankStatus& s) {
  if (s.code == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.code),
                      std::string(s.message, strnlen(s.message, sizeof(s.message))));
}

}  // namespace kvbuffer::parallel
