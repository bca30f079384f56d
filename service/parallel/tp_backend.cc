#include "service/parallel/tp_backend.h"

#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "service/parallel/tp_worker.h"

namespace kvbuffer::parallel {
namespace {

bool ValidDType(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

void NoMeta(void*) {}
absl::Status NoInputs(int32_t, void*) { return absl::OkStatus(); }
absl::Status NoOutputs(const uint8_t*, size_t) { return absl::OkStatus(); }

// Where a step's activations sit in raw_dev_ (as the engine stages them: qkv | a | b at
// kTpAlign-aligned offsets).
struct RawLayout {
  size_t qkv_bytes = 0, ab_bytes = 0, a = 0, b = 0, total = 0;
};

RawLayout ComputeRawLayout(const ModelConfig& config, int64_t tokens, size_t es) {
  RawLayout l;
  l.qkv_bytes = static_cast<size_t>(tokens) * config.channels() * es;
  l.ab_bytes = static_cast<size_t>(tokens) * config.num_v_heads * es;
  l.a = TpAlign(l.qkv_bytes);
  l.b = l.a + TpAlign(l.ab_bytes);
  l.total = l.b + TpAlign(l.ab_bytes);
  return l;
}

// Enqueues the strided copies that cut `shard`'s activations (its qkv channel runs, its value
// heads of a and b) out of the full ones in transport memory into `dst` laid out as `layout`:
// what SliceActivations does on the host.
absl::Status SliceInTransport(TpTransport& t, const ModelConfig& config, const HeadShard& shard,
                              size_t es, int64_t tokens, const uint8_t* raw, const RawLayout& raw_l,
                              uint8_t* dst, const StepInputLayout& layout) {
  const size_t rows = static_cast<size_t>(tokens);
  const auto runs = ShardChannelRuns(config, shard);
  const size_t full_row = static_cast<size_t>(config.channels()) * es;
  const size_t shard_row = static_cast<size_t>(runs[2].dst + runs[2].len) * es;
  for (const ChannelRun& run : runs) {
    if (run.len == 0) continue;
    if (absl::Status s = t.Copy2D(dst + layout.qkv + run.dst * es, shard_row, raw + run.src * es,
                                  full_row, static_cast<size_t>(run.len) * es, rows);
        !s.ok()) {
      return s;
    }
  }
  const size_t full_heads = static_cast<size_t>(config.num_v_heads) * es;
  const size_t shard_heads = static_cast<size_t>(shard.num_v_heads) * es;
  const size_t first = static_cast<size_t>(shard.v_head_begin) * es;
  if (absl::Status s = t.Copy2D(dst + layout.a, shard_heads, raw + raw_l.a + first, full_heads,
                                shard_heads, rows);
      !s.ok()) {
    return s;
  }
  return t.Copy2D(dst + layout.b, shard_heads, raw + raw_l.b + first, full_heads, shard_heads,
                  rows);
}

}  // namespace

absl::StatusOr<std::unique_ptr<TpBackend>> TpBackend::Create(std::unique_ptr<TpTransport> transport,
                                                             std::unique_ptr<ShardCompute> compute,
                                                             TpOptions options) {
  if (transport == nullptr || compute == nullptr) {
    return absl::InvalidArgumentError("TpBackend needs a transport and a shard compute");
  }
  if (transport->rank() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("TpBackend runs on rank 0, not rank ", transport->rank()));
  }
  if (options.command_bytes < sizeof(CommandHeader) + kTpAlign) {
    return absl::InvalidArgumentError(
        absl::StrCat("command_bytes must be at least ", sizeof(CommandHeader) + kTpAlign));
  }
  std::unique_ptr<TpBackend> b(
      new TpBackend(std::move(transport), std::move(compute), std::move(options)));
  b->StartHeartbeat();
  return b;
}

TpBackend::TpBackend(std::unique_ptr<TpTransport> transport, std::unique_ptr<ShardCompute> compute,
                     TpOptions options)
    : options_(std::move(options)),
      world_(transport->world_size()),
      transport_(std::move(transport)),
      compute_(std::move(compute)),
      exec_(transport_.get(), compute_.get(), &options_),
      block_bytes_(options_.command_bytes),
      last_command_(absl::Now()),
      rank_memory_(world_),
      statuses_(world_),
      name_(absl::StrCat(compute_->backend().Name(), "-tp", world_)) {}

void TpBackend::StartHeartbeat() {
  if (options_.heartbeat_interval > absl::ZeroDuration()) {
    heartbeat_ = std::thread([this] { HeartbeatLoop(); });
  }
}

TpBackend::~TpBackend() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    if (health_.ok()) Bare(TpOp::kShutdown).IgnoreError();
  }
  if (heartbeat_.joinable()) heartbeat_.join();
  {
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) {
      for (InProcessWorker& w : workers_) w.transport->Abort();
    }
  }
  for (InProcessWorker& w : workers_) {
    if (w.thread.joinable()) w.thread.join();
  }
}

std::string TpBackend::Name() const { return name_; }

absl::Status TpBackend::Health() const {
  absl::MutexLock lock(&stats_mu_);
  return published_health_;
}

absl::Status TpBackend::CheckUsable() const {
  if (!health_.ok()) return health_;
  if (!allocated_) return absl::FailedPreconditionError("TpBackend: Allocate was not called");
  return absl::OkStatus();
}

absl::Status TpBackend::Break(const absl::Status& why) {
  if (!health_.ok()) return health_;
  health_ = absl::Status(
      why.code(), absl::StrCat("tensor-parallel group of ", world_, " is broken: ", why.message()));
  {
    absl::MutexLock lock(&stats_mu_);
    published_health_ = health_;
  }
  transport_->Abort();
  for (InProcessWorker& w : workers_) w.transport->Abort();
  if (options_.on_broken) options_.on_broken(health_);
  return health_;
}

void TpBackend::HeartbeatLoop() {
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    const absl::Time due = last_command_ + options_.heartbeat_interval;
    if (health_.ok() && absl::Now() >= due) {
      Bare(TpOp::kNoop).IgnoreError();  // a failure breaks the group and is reported there
      continue;
    }
    auto wake = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_; };
    if (health_.ok()) {
      mu_.AwaitWithDeadline(absl::Condition(&wake), due);
    } else {
      mu_.Await(absl::Condition(&wake));
    }
  }
}

absl::Status TpBackend::Ping() {
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return health_;
  return Bare(TpOp::kNoop);
}

absl::Status TpBackend::Bare(TpOp op) {
  CommandHeader h;
  h.op = static_cast<uint32_t>(op);
  return Command(
      h, NoMeta, NoInputs, [](const void*, void*) { return absl::OkStatus(); }, NoOutputs);
}

absl::Status TpBackend::Command(CommandHeader& h, MetaWriter write_meta, InputWriter write_inputs,
                                LocalRunner run_local, OutputReader read_outputs) {
  if (!health_.ok()) return health_;
  TpTransport& t = *transport_;
  const size_t window = options_.command_bytes;  // the block's part every rank reads on its host
  const size_t B = block_bytes_;                 // this command's block, agreed in advance
  const size_t mb = static_cast<size_t>(h.meta_bytes);
  const size_t ib = static_cast<size_t>(h.input_bytes);
  const size_t world = static_cast<size_t>(world_);
  const bool shutdown = static_cast<TpOp>(h.op) == TpOp::kShutdown;
  h.magic = kTpMagic;
  h.layout = kTpLayout;
  h.meta_inline = BlockBytesWithMeta(h) <= window ? 1 : 0;
  h.inputs_inline = h.meta_inline && ib > 0 && BlockBytesWithInputs(h, world_) <= B ? 1 : 0;
  const bool meta_round = !h.meta_inline;
  const bool input_round = ib > 0 && !h.inputs_inline;
  const size_t slot = GatherSlotBytes(h);

  // Everything this command needs, before anything is sent: a refusal here changes nothing.
  absl::StatusOr<void*> block_dev = block_dev_.Reserve(t, B);
  absl::StatusOr<void*> block_host = block_host_.Reserve(t, window);
  absl::StatusOr<void*> meta_dev = meta_round ? meta_dev_.Reserve(t, mb) : nullptr;
  absl::StatusOr<void*> meta_host = meta_round ? meta_host_.Reserve(t, mb) : nullptr;
  absl::StatusOr<void*> in_dev = input_round ? in_dev_.Reserve(t, world * ib) : nullptr;
  absl::StatusOr<void*> gather = shutdown ? nullptr : gather_dev_.Reserve(t, world * slot);
  absl::StatusOr<void*> status_host =
      shutdown ? nullptr : status_host_.Reserve(t, world * sizeof(RankStatus));
  for (const absl::StatusOr<void*>* r :
       {&block_dev, &block_host, &meta_dev, &meta_host, &in_dev, &gather, &status_host}) {
    if (!r->ok()) return r->status();
  }
  h.sequence = ++sequence_;
  h.next_block_bytes = static_cast<int64_t>(NextBlockBytes(h));
  last_command_ = absl::Now();
  for (InProcessWorker& w : workers_) {
    if (w.doorbell != nullptr) w.doorbell->Ring();
  }

  // Host side of rounds A and B: the header and the metadata.
  uint8_t* block = static_cast<uint8_t*>(*block_host);
  std::memcpy(block, &h, sizeof(h));
  size_t used = sizeof(h);
  if (mb > 0) {
    if (h.meta_inline) {
      write_meta(block + kMetaOffset);
      used = kMetaOffset + mb;
    } else {
      write_meta(*meta_host);
    }
  }

  // Rounds A and B. Each rank's inputs are placed in transport memory (in the block when inline)
  // before the block goes out.
  absl::Status s = t.CopyIn(*block_dev, block, used);
  for (int32_t r = 0; s.ok() && ib > 0 && r < world_; ++r) {
    s = write_inputs(r, h.inputs_inline
                            ? static_cast<uint8_t*>(*block_dev) + InlineInputOffset(h, r)
                            : static_cast<uint8_t*>(*in_dev) + r * ib);
  }
  if (s.ok()) s = t.Broadcast(*block_dev, B);
  if (s.ok()) block_bytes_ = static_cast<size_t>(h.next_block_bytes);  // every rank switches
  if (s.ok() && meta_round) s = t.CopyIn(*meta_dev, *meta_host, mb);
  if (s.ok() && (meta_round || input_round)) {
    // Point-to-point only inside the group (the metadata goes to each rank before its inputs,
    // in the order the ranks post their receives).
    s = InGroup(t, [&]() -> absl::Status {
      for (int32_t r = 1; r < world_; ++r) {
        if (meta_round) {
          if (absl::Status e = t.Send(*meta_dev, mb, r); !e.ok()) return e;
        }
        if (input_round) {
          if (absl::Status e = t.Send(static_cast<uint8_t*>(*in_dev) + r * ib, ib, r); !e.ok()) {
            return e;
          }
        }
      }
      return absl::OkStatus();
    });
  }
  if (!s.ok()) return Break(s);
  if (shutdown) {
    s = t.Sync(options_.op_timeout);
    return s.ok() ? s : Break(s);
  }

  // Shard 0's part.
  const void* inputs0 = ib == 0 ? nullptr
                        : h.inputs_inline
                            ? static_cast<uint8_t*>(*block_dev) + InlineInputOffset(h, 0)
                            : *in_dev;
  uint8_t* g = static_cast<uint8_t*>(*gather);
  const absl::Status local = run_local(inputs0, g + sizeof(RankStatus));
  if (absl::Status th = t.Health(); !th.ok()) return Break(th);

  // Round C: every other rank's status and payload.
  s = InGroup(t, [&]() -> absl::Status {
    for (int32_t r = 1; r < world_; ++r) {
      if (absl::Status e = t.Recv(g + r * slot, slot, r); !e.ok()) return e;
    }
    return absl::OkStatus();
  });
  uint8_t* st = static_cast<uint8_t*>(*status_host);
  for (int32_t r = 1; s.ok() && r < world_; ++r) {
    s = t.CopyOut(st + r * sizeof(RankStatus), g + r * slot, sizeof(RankStatus));
  }
  if (s.ok()) s = read_outputs(g, slot);
  if (s.ok()) s = t.Sync(options_.op_timeout);
  if (!s.ok()) return Break(s);

  statuses_[0] = local;
  int32_t failed = local.ok() ? 0 : 1;
  const TpOp op = static_cast<TpOp>(h.op);
  const bool refresh = op != TpOp::kStep && op != TpOp::kFold && op != TpOp::kCommitConv;
  const BackendMemory own = refresh ? compute_->backend().Memory() : BackendMemory{};
  for (int32_t r = 1; r < world_; ++r) {
    RankStatus rs;
    std::memcpy(&rs, st + r * sizeof(RankStatus), sizeof(rs));
    if (rs.rank != r || rs.sequence != h.sequence) {
      return Break(absl::InternalError(absl::StrCat("rank ", r, " answered command ", rs.sequence,
                                                    " as rank ", rs.rank, "; expected command ",
                                                    h.sequence)));
    }
    statuses_[r] = GetStatus(rs);
    failed += statuses_[r].ok() ? 0 : 1;
  }
  {
    absl::MutexLock lock(&stats_mu_);
    if (refresh) rank_memory_[0] = own;
    for (int32_t r = 1; r < world_; ++r) {
      const RankStatus* rs = reinterpret_cast<const RankStatus*>(st + r * sizeof(RankStatus));
      rank_memory_[r] =
          BackendMemory{rs->pool_bytes, rs->device_total_bytes, rs->device_free_bytes};
    }
  }
  if (failed == 0) return absl::OkStatus();
  if (failed == world_) return statuses_[0];  // refused everywhere: nothing changed anywhere
  int32_t bad = 0;
  while (statuses_[bad].ok()) ++bad;
  return Break(absl::InternalError(
      absl::StrCat("ranks diverged on a ", TpOpName(static_cast<TpOp>(h.op)), " (rank ", bad,
                   " failed where others succeeded: ", statuses_[bad].message(), ")")));
}

size_t TpBackend::NextBlockBytes(const CommandHeader& h) {
  const size_t window = options_.command_bytes;
  const TpOp op = static_cast<TpOp>(h.op);
  if (op == TpOp::kNoop) recent_needs_.fill(0);  // idle: forget the steps
  // Commands come in runs (a step per layer, then a commit or fold per layer): after anything but
  // a step, the next command is most likely not a step and needs no large block.
  if (op != TpOp::kStep) return window;
  if (h.input_bytes > 0) {
    const size_t need = BlockBytesWithInputs(h, world_);
    recent_needs_[recent_next_++ % recent_needs_.size()] =
        need <= options_.max_block_bytes ? need : 0;  // too large: round B
  }
  size_t want = window;
  for (size_t need : recent_needs_) want = std::max(want, need);
  if (want == window) return window;
  // Whole 64 KiB steps keep the size steady when batches vary a little.
  const size_t cap = std::max(window, options_.max_block_bytes);
  return std::min(cap, (want + (size_t{64} << 10) - 1) / (size_t{64} << 10) * (size_t{64} << 10));
}

absl::Status TpBackend::Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                                 const PoolSizes& sizes) {
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return health_;
  if (std::string m = ValidateModelConfig(config); !m.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model: ", m));
  }
  absl::StatusOr<std::vector<HeadShard>> shards = MakeHeadShards(config, world_);
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
  config_ = config;
  shards_ = *std::move(shards);
  shard_config_ = ShardModelConfig(config, shards_[0]);
  if (direct_ != nullptr) direct_->fanout.SetShards(config, shards_);
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kAllocate);
  PutModel(config, sizes, &h);
  h.input_bytes = static_cast<int64_t>(ParamBytes(shard_config_));
  allocated_ = false;
  const size_t ib = static_cast<size_t>(h.input_bytes);
  absl::StatusOr<void*> params_host = in_host_.Reserve(*transport_, world_ * ib);
  if (!params_host.ok()) return params_host.status();
  absl::Status s = Command(
      h, NoMeta,
      [&](int32_t r, void* dst) {
        uint8_t* host = static_cast<uint8_t*>(*params_host) + r * ib;
        PackParams(shard_config_, ShardAllLayerParams(config, shards_[r], params), host);
        return transport_->CopyIn(dst, host, ib);
      },
      [&](const void*, void*) {
        return exec_.Allocate(config, ShardAllLayerParams(config, shards_[0], params), sizes);
      },
      NoOutputs);
  if (s.ok()) allocated_ = true;
  return s;
}

absl::Status TpBackend::RunLayerStep(const LayerStep& step) {
  absl::MutexLock lock(&mu_);
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
  if (step.out_row_stride != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("out_row_stride must be 0 for this backend, got ", step.out_row_stride));
  }
  if (direct_ != nullptr) return RunDirectStep(step);
  const bool has_tokens = !step.items.empty() && step.total_tokens > 0;
  const int64_t T = step.total_tokens;
  const size_t in_es = DTypeSize(step.in_dtype);
  const size_t out_es = DTypeSize(step.out_dtype);
  const StepInputLayout layout = ComputeStepInputLayout(shard_config_, T, step.in_dtype);
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kStep);
  h.layer = step.layer;
  h.kind = static_cast<int32_t>(step.kind);
  h.in_dtype = static_cast<int32_t>(step.in_dtype);
  h.out_dtype = static_cast<int32_t>(step.out_dtype);
  h.total_tokens = step.total_tokens;
  h.num_items = static_cast<int32_t>(step.items.size());
  h.page_table_len = static_cast<int32_t>(step.page_table.size());
  h.meta_bytes = static_cast<int64_t>(StepMetaBytes(step.items.size(), step.page_table.size()));
  h.input_bytes = has_tokens ? static_cast<int64_t>(layout.total) : 0;
  h.output_bytes =
      has_tokens ? static_cast<int64_t>(StepOutputBytes(shard_config_, T, step.out_dtype)) : 0;

  const size_t shard_row = static_cast<size_t>(shard_config_.out_elems()) * out_es;
  const size_t full_row = static_cast<size_t>(config_.out_elems()) * out_es;
  const size_t out_bytes = static_cast<size_t>(T) * full_row;
  // Outputs are gathered straight into the engine's buffer when it is ours (page-locked).
  const bool direct_out = has_tokens && IsHostBuffer(step.out, out_bytes);
  void* out_host = direct_out ? step.out : nullptr;
  const RawLayout raw_l = ComputeRawLayout(config_, T, in_es);
  uint8_t* raw = nullptr;
  if (has_tokens) {
    if (!direct_out) {
      absl::StatusOr<void*> o = out_host_.Reserve(*transport_, out_bytes);
      if (!o.ok()) return o.status();
      out_host = *o;
    }
    absl::StatusOr<void*> r = raw_dev_.Reserve(*transport_, raw_l.total);
    if (!r.ok()) return r.status();
    raw = static_cast<uint8_t*>(*r);
  }
  const MetaView meta{step.items, {}, {}, step.page_table};
  absl::Status s = Command(
      h, [&](void* dst) { PackStepMeta(step.items, step.page_table, dst); },
      [&](int32_t r, void* dst) -> absl::Status {
        if (r == 0) {
          // The activations go to transport memory once, as they are: one transfer when the
          // engine staged them as qkv | a | b at this layout's offsets.
          const auto* qkv = static_cast<const uint8_t*>(step.qkv);
          if (step.a == qkv + raw_l.a && step.b == qkv + raw_l.b) {
            if (absl::Status c = transport_->CopyIn(raw, qkv, raw_l.b + raw_l.ab_bytes); !c.ok()) {
              return c;
            }
          } else {
            for (const auto& [at, src, bytes] :
                 {std::tuple<size_t, const void*, size_t>{0, step.qkv, raw_l.qkv_bytes},
                  {raw_l.a, step.a, raw_l.ab_bytes},
                  {raw_l.b, step.b, raw_l.ab_bytes}}) {
              if (absl::Status c = transport_->CopyIn(raw + at, src, bytes); !c.ok()) return c;
            }
          }
        }
        return SliceInTransport(*transport_, config_, shards_[r], in_es, T, raw, raw_l,
                                static_cast<uint8_t*>(dst), layout);
      },
      [&](const void* inputs, void* payload) { return exec_.RunLocal(h, meta, inputs, payload); },
      [&](const uint8_t* gather, size_t slot) -> absl::Status {
        if (!has_tokens) return absl::OkStatus();
        // Each rank's [T][HV/N][V] lands in its heads of [T][HV][V] by one strided copy.
        for (int32_t r = 0; r < world_; ++r) {
          absl::Status c = transport_->CopyOut2D(static_cast<uint8_t*>(out_host) + r * shard_row,
                                                 full_row, gather + r * slot + sizeof(RankStatus),
                                                 shard_row, shard_row, static_cast<size_t>(T));
          if (!c.ok()) return c;
        }
        return absl::OkStatus();
      });
  if (!s.ok()) return s;
  if (has_tokens && !direct_out) std::memcpy(step.out, out_host, out_bytes);
  return absl::OkStatus();
}

absl::Status TpBackend::RunDirectStep(const LayerStep& step) {
  if (absl::Status s = direct_->fanout.Run(step, direct_->backends, direct_->locks,
                                           /*check_values=*/true);
      !s.ok()) {
    return s;  // refused before any rank ran: nothing changed
  }
  const std::span<const absl::Status> statuses = direct_->fanout.statuses();
  int32_t failed = 0;
  for (const absl::Status& st : statuses) failed += st.ok() ? 0 : 1;
  if (failed == 0) return absl::OkStatus();
  int32_t bad = 0;
  while (statuses[bad].ok()) ++bad;
  const absl::StatusCode code = statuses[bad].code();
  if (failed == world_ && code != absl::StatusCode::kUnavailable &&
      code != absl::StatusCode::kInternal) {
    return statuses[0];  // the same refusal on every rank: nothing changed
  }
  // A rank whose device failed or hangs, or ranks that disagree: the group is done.
  return Break(
      absl::Status(failed == world_ ? code : absl::StatusCode::kInternal,
                   absl::StrCat("tensor-parallel rank ", bad,
                                failed == world_ ? " failed a step: "
                                                 : " failed a step that other ranks applied: ",
                                statuses[bad].message())));
}

absl::Status TpBackend::FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                                    std::span<const int32_t> page_table) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kFold);
  h.layer = layer;
  h.num_items = static_cast<int32_t>(items.size());
  h.page_table_len = static_cast<int32_t>(page_table.size());
  h.meta_bytes = static_cast<int64_t>(FoldMetaBytes(items.size(), page_table.size()));
  const MetaView meta{{}, items, {}, page_table};
  return Command(
      h, [&](void* dst) { PackFoldMeta(items, page_table, dst); }, NoInputs,
      [&](const void* in, void* out) { return exec_.RunLocal(h, meta, in, out); }, NoOutputs);
}

absl::Status TpBackend::CommitConv(int32_t layer, std::span<const ConvCommitItem> items) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kCommitConv);
  h.layer = layer;
  h.num_items = static_cast<int32_t>(items.size());
  h.meta_bytes = static_cast<int64_t>(items.size_bytes());
  const MetaView meta{{}, {}, items, {}};
  return Command(
      h,
      [&](void* dst) {
        if (!items.empty()) std::memcpy(dst, items.data(), items.size_bytes());
      },
      NoInputs, [&](const void* in, void* out) { return exec_.RunLocal(h, meta, in, out); },
      NoOutputs);
}

absl::Status TpBackend::ResetConv(std::span<const int32_t> conv_slots) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kResetConv);
  h.num_items = static_cast<int32_t>(conv_slots.size());
  h.meta_bytes = static_cast<int64_t>(conv_slots.size_bytes());
  const MetaView meta{{}, {}, {}, conv_slots};
  return Command(
      h,
      [&](void* dst) {
        if (!conv_slots.empty()) std::memcpy(dst, conv_slots.data(), conv_slots.size_bytes());
      },
      NoInputs, [&](const void* in, void* out) { return exec_.RunLocal(h, meta, in, out); },
      NoOutputs);
}

absl::Status TpBackend::ReadState(int32_t state_slot, int32_t layer, float* out) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckUsable(); !s.ok()) return s;
  if (out == nullptr) return absl::InvalidArgumentError("ReadState: out is null");
  const size_t shard_bytes = static_cast<size_t>(shard_config_.state_elems()) * sizeof(float);
  absl::StatusOr<void*> host = out_host_.Reserve(*transport_, world_ * shard_bytes);
  if (!host.ok()) return host.status();
  CommandHeader h;
  h.op = static_cast<uint32_t>(TpOp::kReadState);
  h.layer = layer;
  h.state_slot = state_slot;
  h.output_bytes = static_cast<int64_t>(TpAlign(shard_bytes));
  absl::Status s = Command(
      h, NoMeta, NoInputs,
      [&](const void* in, void* payload) { return exec_.RunLocal(h, MetaView{}, in, payload); },
      [&](const uint8_t* gather, size_t slot) -> absl::Status {
        for (int32_t r = 0; r < world_; ++r) {
          absl::Status c = transport_->CopyOut(static_cast<uint8_t*>(*host) + r * shard_bytes,
                                               gather + r * slot + sizeof(RankStatus), shard_bytes);
          if (!c.ok()) return c;
        }
        return absl::OkStatus();
      });
  if (!s.ok()) return s;
  // Shard r's [HV/N][K][V] is block r of [HV][K][V].
  std::memcpy(out, *host, world_ * shard_bytes);
  return absl::OkStatus();
}

void* TpBackend::AllocateHostBuffer(size_t bytes) {
  void* p = nullptr;
  {
    absl::MutexLock lock(&mu_);
    p = transport_->AllocateHost(bytes);
  }
  if (p != nullptr) {
    absl::MutexLock lock(&host_mu_);
    host_buffers_.push_back({static_cast<const uint8_t*>(p), bytes});
  }
  return p;
}

void TpBackend::FreeHostBuffer(void* p) {
  if (p == nullptr) return;
  {
    absl::MutexLock lock(&host_mu_);
    for (size_t i = 0; i < host_buffers_.size(); ++i) {
      if (host_buffers_[i].first == p) {
        host_buffers_[i] = host_buffers_.back();
        host_buffers_.pop_back();
        break;
      }
    }
  }
  absl::MutexLock lock(&mu_);
  transport_->FreeHost(p);
}

bool TpBackend::IsHostBuffer(const void* p, size_t bytes) const {
  const auto* q = static_cast<const uint8_t*>(p);
  absl::MutexLock lock(&host_mu_);
  for (const auto& [data, size] : host_buffers_) {
    if (q >= data && q + bytes <= data + size) return true;
  }
  return false;
}

BackendMemory TpBackend::Memory() const {
  absl::MutexLock lock(&stats_mu_);
  BackendMemory total;
  for (int32_t r = 0; r < world_; ++r) {
    total.pool_bytes += rank_memory_[r].pool_bytes;
    total.device_total_bytes += rank_memory_[r].device_total_bytes;
    total.device_free_bytes += rank_memory_[r].device_free_bytes;
  }
  return total;
}

absl::StatusOr<std::unique_ptr<TpBackend>> MakeInProcessTpBackend(
    std::vector<std::unique_ptr<TpTransport>> transports,
    std::vector<std::unique_ptr<ShardCompute>> computes, TpOptions options) {
  if (transports.empty() || transports.size() != computes.size()) {
    return absl::InvalidArgumentError("one transport and one shard compute per rank");
  }
  for (size_t r = 0; r < transports.size(); ++r) {
    if (transports[r] == nullptr || computes[r] == nullptr ||
        transports[r]->rank() != static_cast<int32_t>(r) ||
        transports[r]->world_size() != static_cast<int32_t>(transports.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("transport ", r, " is not rank ", r, " of ", transports.size()));
    }
  }
  if (options.command_bytes < sizeof(CommandHeader) + kTpAlign) {
    return absl::InvalidArgumentError(
        absl::StrCat("command_bytes must be at least ", sizeof(CommandHeader) + kTpAlign));
  }
  std::unique_ptr<TpBackend> b(
      new TpBackend(std::move(transports[0]), std::move(computes[0]), std::move(options)));
  b->workers_.reserve(transports.size() - 1);
  for (size_t r = 1; r < transports.size(); ++r) {
    b->workers_.push_back(
        {std::move(transports[r]), std::move(computes[r]), nullptr, nullptr, {}, {}});
  }
  // Every in-process worker waits for a doorbell before it posts a command's receive: no NCCL
  // operation stays pending on its GPU between commands, so other users of that GPU in this
  // process (direct host steps, another group, a cudaFree) never wait on one.
  for (TpBackend::InProcessWorker& w : b->workers_) {
    w.compute_mu = std::make_unique<absl::Mutex>();
    w.doorbell = std::make_unique<TpDoorbell>();
  }
  if (b->options_.direct_host_steps) {
    auto d = std::make_unique<TpBackend::DirectSteps>(b->world_, b->options_.direct_copy_threads,
                                                      b->options_.direct_scratch_allocator,
                                                      b->options_.direct_spin);
    d->backends.push_back(&b->compute_->backend());
    d->locks.push_back(nullptr);  // rank 0's shard is only driven under the group's lock
    for (TpBackend::InProcessWorker& w : b->workers_) {
      d->backends.push_back(&w.compute->backend());
      d->locks.push_back(w.compute_mu.get());
    }
    b->direct_ = std::move(d);
  }
  for (TpBackend::InProcessWorker& w : b->workers_) {
    w.thread = std::thread([&w, opts = &b->options_] {
      w.result = RunTpWorker(*w.transport, *w.compute, *opts, w.compute_mu.get(), w.doorbell.get());
    });
  }
  b->StartHeartbeat();
  return b;
}

}  // namespace kvbuffer::parallel
