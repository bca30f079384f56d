#include "service/parallel/local_transport.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "service/parallel/head_shard.h"

namespace kvbuffer::parallel {
namespace {

// Mailboxes between every ordered pair of ranks, FIFO like NCCL's point-to-point channels.
class Hub {
 public:
  explicit Hub(int32_t world) : world_(world), boxes_(static_cast<size_t>(world) * world) {}

  void Post(int32_t from, int32_t to, const void* data, size_t bytes) {
    absl::MutexLock lock(&mu_);
    boxes_[from * world_ + to].emplace_back(static_cast<const char*>(data), bytes);
  }

  // Takes the next message from `from` to `to` into dst (exactly `bytes` bytes).
  absl::Status Take(int32_t from, int32_t to, void* dst, size_t bytes, absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    std::deque<std::string>& box = boxes_[from * world_ + to];
    auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return aborted_ || !box.empty(); };
    if (!mu_.AwaitWithDeadline(absl::Condition(&ready), deadline)) {
      return absl::UnavailableError(absl::StrCat(
          "tensor-parallel rank ", to, ": no message from rank ", from, " before the deadline"));
    }
    if (aborted_) {
      return absl::UnavailableError(absl::StrCat("tensor-parallel group aborted (rank ", to,
                                                 " waiting for rank ", from, ")"));
    }
    std::string msg = std::move(box.front());
    box.pop_front();
    if (msg.size() != bytes) {
      return absl::InternalError(absl::StrCat("tensor-parallel rank ", to, ": rank ", from,
                                              " sent ", msg.size(), " bytes, expected ", bytes));
    }
    std::memcpy(dst, msg.data(), bytes);
    return absl::OkStatus();
  }

  void Abort() {
    absl::MutexLock lock(&mu_);
    aborted_ = true;
  }

  bool aborted() {
    absl::MutexLock lock(&mu_);
    return aborted_;
  }

 private:
  const int32_t world_;
  absl::Mutex mu_;
  std::vector<std::deque<std::string>> boxes_ ABSL_GUARDED_BY(mu_);
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
};

class LocalTransport : public TpTransport {
 public:
  LocalTransport(std::shared_ptr<Hub> hub, int32_t rank, int32_t world)
      : hub_(std::move(hub)), rank_(rank), world_(world) {}

  int32_t rank() const override { return rank_; }
  int32_t world_size() const override { return world_; }
  bool host_accessible() const override { return true; }
  void* stream() const override { return nullptr; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    if (p == nullptr) return absl::ResourceExhaustedError("host transport memory");
    return p;
  }
  void Free(void* p) override { std::free(p); }
  void* AllocateHost(size_t bytes) override {
    return std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  }
  void FreeHost(void* p) override { std::free(p); }

  absl::Status CopyIn(void* dst, const void* src, size_t bytes) override {
    return Enqueue({Op::kCopy, dst, src, bytes});
  }
  absl::Status CopyOut(void* dst, const void* src, size_t bytes) override {
    return Enqueue({Op::kCopy, dst, src, bytes});
  }
  absl::Status CopyOut2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                         size_t width, size_t rows) override {
    Op op{Op::kCopy2D, dst, src, width};
    op.dst_pitch = dst_pitch;
    op.src_pitch = src_pitch;
    op.rows = rows;
    return Enqueue(op);
  }
  absl::Status Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                      size_t rows) override {
    return CopyOut2D(dst, dst_pitch, src, src_pitch, width, rows);
  }
  absl::Status Broadcast(void* buf, size_t bytes) override {
    auto body = [&]() -> absl::Status {
      if (rank_ != 0) return Recv(buf, bytes, 0);
      for (int32_t r = 1; r < world_; ++r) {
        if (absl::Status s = Send(buf, bytes, r); !s.ok()) return s;
      }
      return absl::OkStatus();
    };
    return in_group_ ? body() : InGroup(*this, body);
  }
  absl::Status GroupStart() override {
    if (in_group_) return absl::FailedPreconditionError("nested transport group");
    in_group_ = true;
    group_begin_ = pending_.size();
    return absl::OkStatus();
  }
  absl::Status Send(const void* buf, size_t bytes, int32_t peer) override {
    if (peer < 0 || peer >= world_ || peer == rank_) {
      return absl::InvalidArgumentError(absl::StrCat("bad peer ", peer));
    }
    Op op{Op::kSend, nullptr, buf, bytes};
    op.peer = peer;
    return Enqueue(op);
  }
  absl::Status Recv(void* buf, size_t bytes, int32_t peer) override {
    if (peer < 0 || peer >= world_ || peer == rank_) {
      return absl::InvalidArgumentError(absl::StrCat("bad peer ", peer));
    }
    Op op{Op::kRecv, buf, nullptr, bytes};
    op.peer = peer;
    return Enqueue(op);
  }
  absl::Status GroupEnd() override {
    if (!in_group_) return absl::FailedPreconditionError("GroupEnd without GroupStart");
    in_group_ = false;
    // Within a group, sends go first so that matching pairs never wait on each other.
    std::stable_partition(pending_.begin() + group_begin_, pending_.end(),
                          [](const Op& op) { return op.kind != Op::kRecv; });
    return absl::OkStatus();
  }

  absl::Status Sync(absl::Duration timeout) override {
    const absl::Time deadline = absl::Now() + timeout;
    if (in_group_) return Fail(absl::FailedPreconditionError("Sync inside a transport group"));
    for (const Op& op : pending_) {
      if (!Health().ok()) break;
      if (hub_->aborted()) {
        Fail(absl::UnavailableError("tensor-parallel group aborted")).IgnoreError();
        break;
      }
      switch (op.kind) {
        case Op::kCopy:
          std::memcpy(op.dst, op.src, op.bytes);
          break;
        case Op::kCopy2D:
          CopyRows(op.src, op.src_pitch, op.dst, op.dst_pitch, static_cast<int64_t>(op.rows),
                   op.bytes);
          break;
        case Op::kSend:
          hub_->Post(rank_, op.peer, op.src, op.bytes);
          break;
        case Op::kRecv:
          if (absl::Status s = hub_->Take(op.peer, rank_, op.dst, op.bytes, deadline); !s.ok()) {
            Fail(s).IgnoreError();
          }
          break;
      }
    }
    pending_.clear();
    return Health();
  }

  void Abort() override {
    hub_->Abort();
    absl::MutexLock lock(&health_mu_);
    if (health_.ok()) health_ = absl::UnavailableError("tensor-parallel group aborted");
  }

  absl::Status Health() const override {
    absl::MutexLock lock(&health_mu_);
    return health_;
  }

 private:
  struct Op {
    enum Kind { kCopy, kCopy2D, kSend, kRecv } kind;
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;  // width for kCopy2D
    size_t dst_pitch = 0, src_pitch = 0, rows = 0;
    int32_t peer = -1;
  };

  absl::Status Enqueue(const Op& op) {
    if (absl::Status h = Health(); !h.ok()) return h;
    pending_.push_back(op);
    return absl::OkStatus();
  }

  absl::Status Fail(absl::Status s) {
    hub_->Abort();  // like ncclCommAbort: peers blocked on this rank fail too
    absl::MutexLock lock(&health_mu_);
    if (health_.ok()) health_ = s;
    return health_;
  }

  std::shared_ptr<Hub> hub_;
  const int32_t rank_;
  const int32_t world_;
  std::vector<Op> pending_;
  bool in_group_ = false;
  size_t group_begin_ = 0;
  mutable absl::Mutex health_mu_;
  absl::Status health_ ABSL_GUARDED_BY(health_mu_);
};

}  // namespace

std::vector<std::unique_ptr<TpTransport>> MakeLocalTransports(int32_t world_size) {
  auto hub = std::make_shared<Hub>(world_size);
  std::vector<std::unique_ptr<TpTransport>> out;
  for (int32_t r = 0; r < world_size; ++r) {
    out.push_back(std::make_unique<LocalTransport>(hub, r, world_size));
  }
  return out;
}

}  // namespace kvbuffer::parallel
