#include "client/mock_worker/activation_source.h"

#include "absl/types/span.h"
#include "client/cpp/tensor_builder.h"

namespace kvbuffer::mock {

ActivationSource::ActivationSource(const ModelConfig& config, DType wire_dtype, uint64_t seed)
    : config_(config), wire_dtype_(wire_dtype), rng_(seed) {}

void ActivationSource::Generate(int32_t tokens, Activations* out) {
  out->tokens = tokens;
  out->qkv.resize(static_cast<size_t>(tokens) * config_.channels());
  out->a.resize(static_cast<size_t>(tokens) * config_.num_v_heads);
  out->b.resize(static_cast<size_t>(tokens) * config_.num_v_heads);
  for (float& v : out->qkv) v = static_cast<float>(2.0 * rng_.Uniform() - 1.0);
  for (float& v : out->a) v = static_cast<float>(2.0 * rng_.Uniform() - 1.0);
  for (float& v : out->b) v = static_cast<float>(4.0 * rng_.Uniform() - 2.0);
  client::RoundToDType(absl::MakeSpan(out->qkv), wire_dtype_);
  client::RoundToDType(absl::MakeSpan(out->a), wire_dtype_);
  client::RoundToDType(absl::MakeSpan(out->b), wire_dtype_);
}

int64_t ActivationSource::UniformInt(int64_t lo, int64_t hi) {
  if (hi <= lo) return lo;
  return lo + static_cast<int64_t>(rng_.Next() % static_cast<uint64_t>(hi - lo + 1));
}

}  // namespace kvbuffer::mock
