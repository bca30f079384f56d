// Grow-only buffers of a TpTransport: transport memory (device memory under NCCL) and the host
// memory its copies are fastest from (page-locked under CUDA). Grow only between commands: a
// buffer must not be resized while transfers on it are in flight.
#pragma once

#include <cstddef>

#include "absl/status/statusor.h"
#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

class TransportBuffer {
 public:
  // `host` selects AllocateHost/FreeHost instead of Allocate/Free.
  explicit TransportBuffer(bool host = false) : host_(host) {}
  // Frees the memory.
  ~TransportBuffer() { Release(); }
  TransportBuffer(const TransportBuffer&) = delete;
  TransportBuffer& operator=(const TransportBuffer&) = delete;

  // Returns at least `bytes` bytes from `t`, growing to twice the request when it must (contents
  // are not kept); RESOURCE_EXHAUSTED when the memory cannot be had.
  absl::StatusOr<void*> Reserve(TpTransport& t, size_t bytes) {
    if (data_ != nullptr && bytes <= size_ && owner_ == &t) return data_;
    Release();
    const size_t size = bytes < 4096 ? 4096 : bytes + bytes / 2;
    if (host_) {
      data_ = t.AllocateHost(size);
      if (data_ == nullptr) return absl::ResourceExhaustedError("cannot allocate host staging");
    } else {
      absl::StatusOr<void*> p = t.Allocate(size);
      if (!p.ok()) return p.status();
      data_ = *p;
    }
    owner_ = &t;
    size_ = size;
    return data_;
  }

  // Frees the memory now.
  void Release() {
    if (data_ != nullptr) {
      if (host_) {
        owner_->FreeHost(data_);
      } else {
        owner_->Free(data_);
      }
    }
    data_ = nullptr;
    size_ = 0;
    owner_ = nullptr;
  }

  // The memory (nullptr before the first Reserve).
  void* data() const { return data_; }

 private:
  const bool host_;
  void* data_ = nullptr;
  size_t size_ = 0;
  TpTransport* owner_ = nullptr;
};

}  // namespace kvbuffer::parallel
