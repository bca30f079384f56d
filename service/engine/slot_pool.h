// A pool of numbered slots (state slots, buffer pages, conv slots) with O(1) take and give.
#pragma once

#include <cstdint>
#include <vector>

namespace kvbuffer {

class SlotPool {
 public:
  // A pool of `size` free slots numbered 0..size-1.
  explicit SlotPool(int32_t size);

  // Takes a free slot; the pool must not be empty (check free() first).
  int32_t Take();

  // Returns `slot` to the pool; it must have been taken.
  void Give(int32_t slot);

  int32_t free() const { return static_cast<int32_t>(free_.size()); }
  int32_t size() const { return size_; }
  int32_t used() const { return size_ - free(); }

 private:
  int32_t size_;
  std::vector<int32_t> free_;   // stack of free slots, lowest on top
  std::vector<uint8_t> taken_;  // guards against double give
};

}  // namespace kvbuffer
