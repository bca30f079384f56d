#include "service/parallel/host_buffer.h"

#include <bit>
#include <cstdlib>
#include <utility>

namespace kvbuffer::parallel {
namespace {

void* HeapAllocate(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  return std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
}

void HeapFree(void* p) { std::free(p); }

}  // namespace

HostAllocator HeapAllocator() { return HostAllocator{&HeapAllocate, &HeapFree}; }

HostBuffer::~HostBuffer() { Free(); }

HostBuffer::HostBuffer(HostBuffer&& other) noexcept
    : allocator_(other.allocator_),
      data_(std::exchange(other.data_, nullptr)),
      capacity_(std::exchange(other.capacity_, 0)) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    Free();
    allocator_ = other.allocator_;
    data_ = std::exchange(other.data_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

void HostBuffer::Free() {
  if (data_ != nullptr) allocator_.deallocate(data_);
  data_ = nullptr;
  capacity_ = 0;
}

void* HostBuffer::Reserve(size_t bytes) {
  if (bytes <= capacity_ && data_ != nullptr) return data_;
  Free();
  const size_t size = std::bit_ceil(bytes < 256 ? size_t{256} : bytes);
  data_ = allocator_.allocate(size);
  if (data_ != nullptr) capacity_ = size;
  return data_;
}

}  // namespace kvbuffer::parallel
