#include "service/parallel/sharded_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvbuffer::parallel {
namespace {

bool ValidDType(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ShardedBackend>> ShardedBackend::Create(
    ShardedBackendOptions options) {
  if (options.num_shards < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor-parallel size ", options.num_shards, " must be >= 1"));
  }
  if (!options.make_shard) {
    return absl::InvalidArgumentError("ShardedBackend needs a shard backend factory");
  }
  if (options.scratch_allocator.allocate == nullptr ||
      options.scratch_allocator.deallocate == nullptr) {
    return absl::InvalidArgumentError("ShardedBackend needs a complete scratch allocator");
  }
  std::vector<std::unique_ptr<Backend>> children;
  children.reserve(options.num_shards);
  for (int32_t s = 0; s < options.num_shards; ++s) {
    std::unique_ptr<Backend> child = options.make_shard(s);
    if (child == nullptr) {
      return absl::InternalError(absl::StrCat("could not create the backend of shard ", s));
    }
    children.push_back(std::move(child));
  }
  return std::unique_ptr<ShardedBackend>(
      new ShardedBackend(std::move(options), std::move(children)));
}

ShardedBackend::ShardedBackend(ShardedBackendOptions options,
                               std::vector<std::unique_ptr<Backend>> children)
    : options_(std::move(options)),
      children_(std::move(children)),
      runner_(static_cast<int32_t>(children_.size()), options_.concurrent),
      fanout_(static_cast<int32_t>(children_.size()), options_.copy_threads, options_.concurrent,
              options_.scratch_allocator),
      statuses_(children_.size()) {
  for (const auto& c : children_) child_ptrs_.push_back(c.get());
}

ShardedBackend::~ShardedBackend() = default;

std::string ShardedBackend::Name() const {
  return absl::StrCat(children_[0]->Name(), "-tp", children_.size());
}

absl::Status ShardedBackend::Health() const {
  absl::MutexLock lock(&health_mu_);
  return health_;
}

absl::Status ShardedBackend::CheckUsable() const {
  if (absl::Status h = Health(); !h.ok()) return h;
  if (!allocated_) return absl::FailedPreconditionError("ShardedBackend: Allocate was not called");
  return absl::OkStatus();
}

absl::Status ShardedBackend::RunAll(absl::FunctionRef<absl::Status(int32_t)> fn) {
  runner_.Run([&](int32_t s) { statuses_[s] = fn(s); });
  return Combine(statuses_);
}

absl::Status ShardedBackend::Combine(std::span<const absl::Status> statuses) {
  int32_t failed = 0;
  for (const absl::Status& s : statuses) failed += s.ok() ? 0 : 1;
  if (failed == 0) return absl::OkStatus();
  if (failed == num_shards()) return statuses[0];  // the same refusal everywhere: nothing changed
  // Some shards applied the call and some did not: their pools no longer describe one model.
  int32_t bad = 0;
  while (statuses[bad].ok()) ++bad;
  absl::Status broken =
      absl::InternalError(absl::StrCat("tensor-parallel shards diverged (shard ", bad,
                                       " failed where others succeeded: ", statuses[bad].message(),
                                       "); the group must be restarted"));
  absl::MutexLock lock(&health_mu_);
  health_ = broken;
  return broken;
}

absl::Status ShardedBackend::Allocate(const ModelConfig& config,
                                      const std::vector<LayerParams>& params,
                                      const PoolSizes& sizes) {
  if (absl::Status h = Health(); !h.ok()) return h;
  if (std::string m = ValidateModelConfig(config); !m.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model: ", m));
  }
  absl::StatusOr<std::vector<HeadShard>> shards = MakeHeadShards(config, num_shards());
  if (!shards.ok()) return shards.status();
  if (static_cast<int64_t>(params.size()) != config.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("params: expected ", config.num_layers, " layers, got ", params.size()));
  }
  for (size_t l = 0; l < params.size(); ++l) {
    if (static_cast<int64_t>(params[l].conv_weight.size()) !=
            static_cast<int64_t>(config.channels()) * config.conv_width ||
        static_cast<int32_t>(params[l].a_log.size()) != config.num_v_heads ||
        static_cast<int32_t>(params[l].dt_bias.size()) != config.num_v_heads) {
      return absl::InvalidArgumentError(
          absl::StrCat("params[", l, "]: shapes do not match the model"));
    }
  }
  allocated_ = false;
  shards_ = *std::move(shards);
  config_ = config;
  shard_configs_.clear();
  for (const HeadShard& shard : shards_) shard_configs_.push_back(ShardModelConfig(config, shard));
  fanout_.SetShards(config, shards_);
  absl::Status s = RunAll([&](int32_t i) {
    return children_[i]->Allocate(shard_configs_[i],
                                  ShardAllLayerParams(config, shards_[i], params), sizes);
  });
  if (!s.ok()) {
    // A partial allocation is not a divergence: nothing has run yet, so the group stays usable.
    absl::MutexLock lock(&health_mu_);
    health_ = absl::OkStatus();
    return s;
  }
  allocated_ = true;
  return absl::OkStatus();
}

absl::Status ShardedBackend::RunLayerStep(const LayerStep& step) {
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  if (!ValidDType(step.in_dtype) || !ValidDType(step.out_dtype)) {
    return absl::InvalidArgumentError("in_dtype and out_dtype must be FP32, FP16 or BF16");
  }
  if (step.total_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("total_tokens ", step.total_tokens, " < 0"));
  }
  if (!step.items.empty() &&
      (step.qkv == nullptr || step.a == nullptr || step.b == nullptr || step.out == nullptr)) {
    return absl::InvalidArgumentError("qkv, a, b and out must not be null");
  }
  if (absl::Status s = fanout_.Run(step, child_ptrs_, {}, options_.check_values_in_shards);
      !s.ok()) {
    return s;
  }
  return Combine(fanout_.statuses());
}

absl::Status ShardedBackend::FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                                         std::span<const int32_t> page_table) {
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  return RunAll([&](int32_t i) { return children_[i]->FoldBuffers(layer, items, page_table); });
}

absl::Status ShardedBackend::CommitConv(int32_t layer, std::span<const ConvCommitItem> items) {
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  return RunAll([&](int32_t i) { return children_[i]->CommitConv(layer, items); });
}

absl::Status ShardedBackend::ResetConv(std::span<const int32_t> conv_slots) {
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  return RunAll([&](int32_t i) { return children_[i]->ResetConv(conv_slots); });
}

absl::Status ShardedBackend::ReadState(int32_t state_slot, int32_t layer, float* out) {
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  if (out == nullptr) return absl::InvalidArgumentError("ReadState: out is null");
  // Shard i's [HV/N][K][V] block is contiguous in [HV][K][V]; a read changes nothing, so a
  // failure here is not a divergence.
  runner_.Run([&](int32_t i) {
    statuses_[i] =
        children_[i]->ReadState(state_slot, layer, out + ShardStateOffset(config_, shards_[i]));
  });
  for (const absl::Status& s : statuses_) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

BackendMemory ShardedBackend::Memory() const {
  BackendMemory total;
  for (const auto& child : children_) {
    const BackendMemory m = child->Memory();
    total.pool_bytes += m.pool_bytes;
    total.device_total_bytes += m.device_total_bytes;
    total.device_free_bytes += m.device_free_bytes;
  }
  return total;
}

absl::StatusOr<std::unique_ptr<ShardedBackend>> MakeShardedCpuBackend(int32_t num_shards) {
  ShardedBackendOptions o;
  o.num_shards = num_shards;
  o.make_shard = [](int32_t) { return MakeCpuBackend(); };
  return ShardedBackend::Create(std::move(o));
}

}  // namespace kvbuffer::parallel
