// Grow-only host scratch memory from a pluggable allocator (plain heap by default; page-locked
// memory when the consumer copies it to a GPU), so that a warm per-step path allocates nothing.
#pragma once

#include <cstddef>

namespace kvbuffer::parallel {

// Where scratch memory comes from. Both functions must be set together.
struct HostAllocator {
  void* (*allocate)(size_t bytes) = nullptr;  // returns nullptr when out of memory
  void (*deallocate)(void* p) = nullptr;
};

// Returns the allocator over the plain heap (64-byte aligned).
HostAllocator HeapAllocator();

// A buffer that only grows (to the next power of two at least as large as asked).
class HostBuffer {
 public:
  // An empty buffer that will allocate from `allocator`.
  explicit HostBuffer(HostAllocator allocator = HeapAllocator()) : allocator_(allocator) {}
  // Returns the memory to its allocator.
  ~HostBuffer();

  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  // Moves the memory; the source becomes empty.
  HostBuffer(HostBuffer&& other) noexcept;
  HostBuffer& operator=(HostBuffer&& other) noexcept;

  // Makes at least `bytes` bytes available and returns them (nullptr if the allocator failed).
  // Contents are not preserved when the buffer grows.
  void* Reserve(size_t bytes);

  // Current memory (nullptr before the first Reserve) and its size.
  void* data() const { return data_; }
  size_t capacity() const { return capacity_; }

 private:
  void Free();

  HostAllocator allocator_;
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace kvbuffer::parallel
