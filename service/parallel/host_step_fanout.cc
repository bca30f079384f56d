#include "service/parallel/host_step_fanout.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "service/engine/activation_check.h"
#include "service/engine/activation_scan.h"

namespace kvbuffer::parallel {
namespace {

using Clock = std::chrono::steady_clock;

size_t Align256(size_t n) { return (n + 255) / 256 * 256; }

// A lane's refusal of a value; Run replaces it with the engine's message for the full tensors.
absl::Status ValueRefused() { return absl::InvalidArgumentError("activation value refused"); }

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

}  // namespace

HostStepFanout::HostStepFanout(int32_t num_shards, int32_t lanes, bool concurrent,
                               HostAllocator scratch_allocator, absl::Duration spin)
    : num_shards_(num_shards),
      lanes_(concurrent ? (lanes > 0 ? lanes : kDefaultFanoutLanes) : 1),
      runner_(num_shards * lanes_, concurrent, spin) {
  scratch_.reserve(num_shards);
  for (int32_t s = 0; s < num_shards; ++s) {
    scratch_.push_back({HostBuffer(scratch_allocator), HostBuffer(scratch_allocator)});
  }
  subs_.resize(num_shards);
  reserved_.resize(num_shards);
  statuses_.resize(num_shards);
  copied_.resize(static_cast<size_t>(num_shards) * lanes_);
}

void HostStepFanout::SetShards(const ModelConfig& config, std::vector<HeadShard> shards) {
  config_ = config;
  shards_ = std::move(shards);
}

HostStepFanoutStats HostStepFanout::Stats() const {
  absl::MutexLock lock(&stats_mu_);
  return stats_;
}

absl::Status HostStepFanout::Reserve(int32_t s, const LayerStep& step, Backend* backend,
                                     LayerStep* sub) {
  *sub = step;
  if (step.items.empty() || step.total_tokens <= 0) return absl::OkStatus();
  const HeadShard& shard = shards_[s];
  const ModelConfig sc = ShardModelConfig(config_, shard);
  const size_t T = static_cast<size_t>(step.total_tokens);
  const size_t es = DTypeSize(step.in_dtype);
  const size_t qkv_bytes = T * sc.channels() * es;
  const size_t ab_bytes = T * sc.num_v_heads * es;
  const size_t a_at = Align256(qkv_bytes), b_at = a_at + Align256(ab_bytes);
  auto* in = static_cast<uint8_t*>(scratch_[s].in.Reserve(b_at + ab_bytes));
  if (in == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("shard ", s, ": cannot allocate ", b_at + ab_bytes, " bytes of host scratch"));
  }
  sub->qkv = in;
  sub->a = in + a_at;
  sub->b = in + b_at;
  const size_t out_es = DTypeSize(step.out_dtype);
  const size_t out_shard_row = static_cast<size_t>(sc.out_elems()) * out_es;
  if (backend->TakesOutputRowStride()) {
    // The backend writes the shard's heads of each output row in place.
    sub->out = static_cast<uint8_t*>(step.out) +
               static_cast<size_t>(shard.v_head_begin) * config_.head_v_dim * out_es;
    sub->out_row_stride = static_cast<size_t>(config_.out_elems()) * out_es;
  } else {
    sub->out = scratch_[s].out.Reserve(T * out_shard_row);
    sub->out_row_stride = 0;
    if (sub->out == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "shard ", s, ": cannot allocate ", T * out_shard_row, " bytes of host scratch"));
    }
  }
  return absl::OkStatus();
}

absl::Status HostStepFanout::CopyRows(int32_t s, const LayerStep& step, int64_t t0, int64_t t1,
                                      bool check_values, const LayerStep& sub) const {
  if (step.items.empty() || step.total_tokens <= 0 || t0 >= t1) return absl::OkStatus();
  const HeadShard& shard = shards_[s];
  const size_t es = DTypeSize(step.in_dtype);
  const auto runs = ShardChannelRuns(config_, shard);
  const size_t full_row = static_cast<size_t>(config_.channels()) * es;
  const size_t shard_row = static_cast<size_t>(runs[2].dst + runs[2].len) * es;
  const size_t full_heads = static_cast<size_t>(config_.num_v_heads) * es;
  const size_t shard_heads = static_cast<size_t>(shard.num_v_heads) * es;
  // The lane's rows [t0, t1) of every tensor, on both sides.
  const auto* qkv = static_cast<const uint8_t*>(step.qkv) + t0 * full_row;
  const auto* a = static_cast<const uint8_t*>(step.a) + t0 * full_heads;
  const auto* b = static_cast<const uint8_t*>(step.b) + t0 * full_heads;
  auto* to_qkv = static_cast<uint8_t*>(const_cast<void*>(sub.qkv)) + t0 * shard_row;
  auto* to_a = static_cast<uint8_t*>(const_cast<void*>(sub.a)) + t0 * shard_heads;
  auto* to_b = static_cast<uint8_t*>(const_cast<void*>(sub.b)) + t0 * shard_heads;
  if (!check_values) {
    SliceActivations(config_, shard, es, t1 - t0, qkv, a, b, to_qkv, to_a, to_b);
    return absl::OkStatus();
  }
  // Each of the shard's q, k and v runs over the lane's rows, then its a and b heads: checked and
  // copied in one pass, with one store fence per call.
  const uint32_t limit = ActivationLimitBits(step.in_dtype);
  const size_t rows = static_cast<size_t>(t1 - t0);
  for (const ChannelRun& r : runs) {
    if (!CopyRowsBelowMagnitude(qkv + r.src * es, full_row, to_qkv + r.dst * es, shard_row, rows,
                                static_cast<size_t>(r.len), step.in_dtype, limit)) {
      return ValueRefused();
    }
  }
  const size_t first = static_cast<size_t>(shard.v_head_begin) * es;
  for (const auto& [from, to] : {std::pair<const uint8_t*, uint8_t*>{a, to_a}, {b, to_b}}) {
    if (!CopyRowsBelowMagnitude(from + first, full_heads, to, shard_heads, rows,
                                static_cast<size_t>(shard.num_v_heads), step.in_dtype, limit)) {
      return ValueRefused();
    }
  }
  return absl::OkStatus();
}

absl::Status HostStepFanout::RunShard(int32_t s, const LayerStep& step, Backend* backend,
                                      absl::Mutex* lock, const LayerStep& sub) {
  absl::Status st;
  if (lock != nullptr) {
    absl::MutexLock l(lock);
    st = backend->RunLayerStep(sub);
  } else {
    st = backend->RunLayerStep(sub);
  }
  if (st.ok() && sub.out != nullptr && sub.out_row_stride == 0 && !step.items.empty() &&
      step.total_tokens > 0) {
    PlaceShardOutputs(config_, shards_[s], DTypeSize(step.out_dtype), step.total_tokens, sub.out,
                      step.out);
  }
  return st;
}

absl::Status HostStepFanout::ValueError(const LayerStep& step) const {
  const size_t T = static_cast<size_t>(step.total_tokens);
  const std::pair<const char*, std::pair<const void*, size_t>> tensors[3] = {
      {"qkv", {step.qkv, T * config_.channels()}},
      {"a", {step.a, T * config_.num_v_heads}},
      {"b", {step.b, T * config_.num_v_heads}}};
  for (const auto& [name, t] : tensors) {
    if (absl::Status s = CheckActivationValues(name, step.in_dtype, t.first, t.second, nullptr);
        !s.ok()) {
      return s;
    }
  }
  return absl::InternalError("a shard refused an activation value that the full scan accepts");
}

absl::Status HostStepFanout::Run(const LayerStep& step, std::span<Backend* const> backends,
                                 std::span<absl::Mutex* const> locks, bool check_values) {
  const auto start = Clock::now();
  if (step.out_row_stride != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("out_row_stride must be 0 for this backend, got ", step.out_row_stride));
  }
  // Scratch first (on this thread): a refusal here changes nothing.
  for (int32_t s = 0; s < num_shards_; ++s) {
    reserved_[s] = Reserve(s, step, backends[s], &subs_[s]);
    if (!reserved_[s].ok()) return reserved_[s];
  }
  auto lock_of = [&](int32_t s) {
    return s < static_cast<int32_t>(locks.size()) ? locks[s] : nullptr;
  };
  const int64_t T = std::max(step.total_tokens, 0);
  auto copy_lane = [&](int32_t l) {
    const int32_t s = l / lanes_, p = l % lanes_;
    copied_[l] = CopyRows(s, step, T * p / lanes_, T * (p + 1) / lanes_, check_values, subs_[s]);
  };
  auto any_refusal = [&] {
    for (const absl::Status& c : copied_) {
      if (!c.ok()) return true;
    }
    return false;
  };
  const int32_t n = num_shards_ * lanes_;
  Clock::time_point prepared;
  bool ran = false;
  if (runner_.concurrent()) {
    // One hand-over: every lane copies its rows, waits for the others (a refusal anywhere stops
    // all before any state is touched), then each shard's first lane runs the shard.
    arrived_.store(0, std::memory_order_relaxed);
    runner_.Run([&](int32_t l) {
      copy_lane(l);
      arrived_.fetch_add(1, std::memory_order_acq_rel);
      for (int i = 0; arrived_.load(std::memory_order_acquire) < n; ++i) {
        if ((i & 63) == 63) std::this_thread::yield();
      }
      if (l == 0) prepared = Clock::now();
      if (l % lanes_ != 0) return;
      const int32_t s = l / lanes_;
      statuses_[s] = any_refusal() ? absl::CancelledError("refused before running")
                                   : RunShard(s, step, backends[s], lock_of(s), subs_[s]);
    });
    ran = !any_refusal();
  } else {
    runner_.Run(copy_lane);
    prepared = Clock::now();
    if (!any_refusal()) {
      runner_.Run(
          [&](int32_t s) { statuses_[s] = RunShard(s, step, backends[s], lock_of(s), subs_[s]); });
      ran = true;
    }
  }
  {
    absl::MutexLock lock(&stats_mu_);
    stats_.steps += 1;
    stats_.prepare_ms += Ms(prepared - start);
    stats_.total_ms += Ms(Clock::now() - start);
  }
  if (ran) return absl::OkStatus();
  for (const absl::Status& c : copied_) {
    if (!c.ok() && c.code() == absl::StatusCode::kInvalidArgument) return ValueError(step);
  }
  return absl::InternalError("a lane failed without a refusal");
}

}  // namespace kvbuffer::parallel
