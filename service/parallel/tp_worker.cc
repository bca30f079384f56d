#include "service/parallel/tp_worker.h"

#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "service/parallel/head_shard.h"
#include "service/parallel/tp_buffers.h"
#include "service/parallel/tp_protocol.h"
#include "service/parallel/tp_rank.h"

namespace kvbuffer::parallel {
namespace {

class Worker {
 public:
  Worker(TpTransport& t, ShardCompute& c, const TpOptions& o, absl::Mutex* mu, TpDoorbell* bell)
      : t_(t), compute_(c), options_(o), exec_(&t, &c, &o), compute_mu_(mu), doorbell_(bell) {}

  absl::Status Run() {
    absl::Status s = Loop();
    if (!s.ok()) t_.Abort();
    return s;
  }

 private:
  absl::Status Loop() {
    if (t_.rank() <= 0) return absl::InvalidArgumentError("RunTpWorker is for ranks > 0");
    const size_t window = options_.command_bytes;  // the part of a block read on the host
    if (window < sizeof(CommandHeader)) {
      return absl::InvalidArgumentError("command_bytes too small");
    }
    absl::StatusOr<void*> block_host = block_host_.Reserve(t_, window);
    if (!block_host.ok()) return block_host.status();
    size_t B = window;  // the next command's block, as the previous one announced
    uint64_t expected = 1;
    while (true) {
      // Round A: the next command (an idle server sends heartbeats, so silence means trouble).
      // Nothing is in flight here, so the block may grow.
      if (doorbell_ != nullptr) {
        // Post the receive only once rank 0 announces the command; meanwhile watch for an
        // aborted group.
        const absl::Time give_up = absl::Now() + options_.idle_timeout;
        while (!doorbell_->WaitFor(expected, absl::Milliseconds(50))) {
          if (absl::Status th = t_.Health(); !th.ok()) return th;
          if (absl::Now() > give_up) {
            return absl::UnavailableError(
                absl::StrCat("waiting for rank 0: no command for ",
                             absl::FormatDuration(options_.idle_timeout)));
          }
        }
      }
      absl::StatusOr<void*> block_dev = block_dev_.Reserve(t_, B);
      if (!block_dev.ok()) return block_dev.status();
      absl::Status s = t_.Broadcast(*block_dev, B);
      if (s.ok()) s = t_.CopyOut(*block_host, *block_dev, window);
      if (s.ok()) s = t_.Sync(options_.idle_timeout);
      if (!s.ok()) {
        return absl::Status(s.code(), absl::StrCat("waiting for rank 0: ", s.message()));
      }
      CommandHeader h;
      std::memcpy(&h, *block_host, sizeof(h));
      if (absl::Status c = CheckHeader(h); !c.ok()) return c;
      if (h.sequence != expected) {
        return absl::InternalError(absl::StrCat("tensor-parallel rank ", t_.rank(),
                                                " expected command ", expected, ", got ",
                                                h.sequence));
      }
      ++expected;
      if (h.next_block_bytes < static_cast<int64_t>(window)) {
        return absl::InternalError(absl::StrCat("tensor-parallel command ", h.sequence,
                                                " announces a block of ", h.next_block_bytes,
                                                " bytes, less than command_bytes=", window));
      }
      B = static_cast<size_t>(h.next_block_bytes);
      if (static_cast<TpOp>(h.op) == TpOp::kShutdown) return absl::OkStatus();
      if (absl::Status e = Execute(h, static_cast<const uint8_t*>(*block_host),
                                   static_cast<uint8_t*>(*block_dev));
          !e.ok()) {
        return e;
      }
    }
  }

  // Rounds B and C of one command, and its local part.
  absl::Status Execute(const CommandHeader& h, const uint8_t* block_host, uint8_t* block_dev) {
    const int32_t rank = t_.rank();
    const size_t ib = static_cast<size_t>(h.input_bytes);
    const size_t mb = static_cast<size_t>(h.meta_bytes);
    const bool round_b = !h.meta_inline || (ib > 0 && !h.inputs_inline);
    const uint8_t* meta_host = block_host + kMetaOffset;
    const void* inputs =
        ib > 0 && h.inputs_inline ? block_dev + InlineInputOffset(h, rank) : nullptr;
    if (round_b) {
      void* meta_dev = nullptr;
      if (!h.meta_inline) {
        absl::StatusOr<void*> d = meta_dev_.Reserve(t_, mb);
        if (!d.ok()) return d.status();
        absl::StatusOr<void*> hh = meta_host_.Reserve(t_, mb);
        if (!hh.ok()) return hh.status();
        meta_dev = *d;
        meta_host = static_cast<const uint8_t*>(*hh);
      }
      if (ib > 0 && !h.inputs_inline) {
        absl::StatusOr<void*> in = in_dev_.Reserve(t_, ib);
        if (!in.ok()) return in.status();
        inputs = *in;
      }
      absl::Status s = InGroup(t_, [&]() -> absl::Status {
        if (meta_dev != nullptr) {
          if (absl::Status e = t_.Recv(meta_dev, mb, 0); !e.ok()) return e;
        }
        if (ib > 0 && !h.inputs_inline) return t_.Recv(const_cast<void*>(inputs), ib, 0);
        return absl::OkStatus();
      });
      if (s.ok() && meta_dev != nullptr) {
        s = t_.CopyOut(const_cast<uint8_t*>(meta_host), meta_dev, mb);
        if (s.ok()) s = t_.Sync(options_.op_timeout);  // the metadata is needed on the host
      }
      if (!s.ok()) return s;
    }
    if (absl::Status d = DecodeMeta(h, meta_host, &meta_); !d.ok()) return d;

    // Round C's slot: status then payload.
    const size_t slot = GatherSlotBytes(h);
    absl::StatusOr<void*> slot_dev = slot_dev_.Reserve(t_, slot);
    if (!slot_dev.ok()) return slot_dev.status();
    absl::StatusOr<void*> status_host = status_host_.Reserve(t_, sizeof(RankStatus));
    if (!status_host.ok()) return status_host.status();
    uint8_t* payload = static_cast<uint8_t*>(*slot_dev) + sizeof(RankStatus);

    absl::Status local;
    const TpOp op = static_cast<TpOp>(h.op);
    {
      // Rank 0 of an in-process group may also drive this shard's backend (direct host steps).
      std::optional<absl::MutexLock> lock;
      if (compute_mu_ != nullptr) lock.emplace(compute_mu_);
      if (op == TpOp::kAllocate) {
        local = Allocate(h, inputs);
      } else {
        local = exec_.RunLocal(h, View(meta_), inputs, payload);
      }
      // Memory figures change only with allocation; refreshing them off the step path keeps a
      // device query out of every decode step.
      if (op != TpOp::kStep && op != TpOp::kFold && op != TpOp::kCommitConv) {
        memory_ = compute_.backend().Memory();
      }
    }
    if (absl::Status th = t_.Health(); !th.ok()) return th;  // the transport broke under compute

    PutStatus(local, rank, h.sequence, memory_, static_cast<RankStatus*>(*status_host));
    absl::Status s = t_.CopyIn(*slot_dev, *status_host, sizeof(RankStatus));
    if (s.ok()) s = InGroup(t_, [&] { return t_.Send(*slot_dev, slot, 0); });
    if (s.ok()) s = t_.Sync(options_.op_timeout);
    return s;
  }

  absl::Status Allocate(const CommandHeader& h, const void* inputs) {
    ModelConfig config;
    PoolSizes sizes;
    GetModel(h, &config, &sizes);
    absl::StatusOr<HeadShard> shard = MakeHeadShard(config, t_.rank(), t_.world_size());
    if (!shard.ok()) return shard.status();
    const ModelConfig sc = ShardModelConfig(config, *shard);
    const size_t bytes = ParamBytes(sc);
    if (static_cast<size_t>(h.input_bytes) != bytes || inputs == nullptr) {
      return absl::InternalError(absl::StrCat("allocate carries ", h.input_bytes,
                                              " parameter bytes per rank, expected ", bytes));
    }
    absl::StatusOr<void*> host = params_host_.Reserve(t_, bytes);
    if (!host.ok()) return host.status();
    absl::Status s = t_.CopyOut(*host, inputs, bytes);
    if (s.ok()) s = t_.Sync(options_.op_timeout);
    if (!s.ok()) return s;
    absl::Status a = exec_.Allocate(config, UnpackParams(sc, *host), sizes);
    params_host_.Release();
    return a;
  }

  TpTransport& t_;
  ShardCompute& compute_;
  const TpOptions& options_;
  RankExecutor exec_;
  absl::Mutex* compute_mu_;
  TpDoorbell* doorbell_;
  DecodedMeta meta_;
  BackendMemory memory_;
  TransportBuffer block_dev_, meta_dev_, in_dev_, slot_dev_;
  TransportBuffer block_host_{true}, meta_host_{true}, status_host_{true}, params_host_{true};
};

}  // namespace

absl::Status RunTpWorker(TpTransport& transport, ShardCompute& compute, const TpOptions& options,
                         absl::Mutex* compute_mu, TpDoorbell* doorbell) {
  Worker w(transport, compute, options, compute_mu, doorbell);
  return w.Run();
}

}  // namespace kvbuffer::parallel
