#include "service/engine/engine_options.h"

#include "absl/strings/str_cat.h"

namespace kvbuffer {

absl::Status ValidateEngineOptions(const EngineOptions& o) {
  if (std::string m = ValidateModelConfig(o.model); !m.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model: ", m));
  }
  if (!o.params.empty() && static_cast<int32_t>(o.params.size()) != o.model.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("params: expected ", o.model.num_layers,
                                                   " layers, got ", o.params.size()));
  }
  auto range = [](const char* name, int64_t v, int64_t lo, int64_t hi) -> absl::Status {
    if (v < lo || v > hi) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", v));
    }
    return absl::OkStatus();
  };
  for (absl::Status s : {range("flush_interval", o.flush_interval, 1, 1024),
                         range("stateless_limit", o.stateless_limit, 0, 65536),
                         range("max_drafts", o.max_drafts, 1, 16),
                         range("max_sequences", o.max_sequences, 1, 1 << 24),
                         range("max_sequences_per_tenant", o.max_sequences_per_tenant, 0, 1 << 24),
                         range("state_slots", o.state_slots, 0, 1 << 24),
                         range("buffer_pages", o.buffer_pages, 0, 1 << 26),
                         range("page_tokens", o.page_tokens, 1, 1024),
                         range("replay_max_tokens", o.replay_max_tokens, 0, 1 << 24)}) {
    if (!s.ok()) return s;
  }
  if (o.max_drafts > o.flush_interval) {
    return absl::InvalidArgumentError(absl::StrCat("max_drafts (", o.max_drafts,
                                                   ") must be <= flush_interval (",
                                                   o.flush_interval, ")"));
  }
  auto dtype_ok = [](DType t) { return t == DType::kFloat32 || t == DType::kBFloat16; };
  if (!dtype_ok(o.buffer_dtype)) return absl::InvalidArgumentError("buffer_dtype must be FP32 or BF16");
  if (!dtype_ok(o.conv_dtype)) return absl::InvalidArgumentError("conv_dtype must be FP32 or BF16");
  if (o.idle_ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("idle_ttl must be > 0");
  }
  return absl::OkStatus();
}

}  // namespace kvbuffer
