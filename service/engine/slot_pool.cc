#include "service/engine/slot_pool.h"

#include <cstdlib>

namespace kvbuffer {

SlotPool::SlotPool(int32_t size) : size_(size), taken_(size, 0) {
  free_.reserve(size);
  for (int32_t i = size - 1; i >= 0; --i) free_.push_back(i);
}

int32_t SlotPool::Take() {
  if (free_.empty()) std::abort();  // callers check free() during admission
  int32_t s = free_.back();
  free_.pop_back();
  taken_[s] = 1;
  return s;
}

void SlotPool::Give(int32_t slot) {
  if (slot < 0 || slot >= size_ || !taken_[slot]) std::abort();  // bookkeeping bug
  taken_[slot] = 0;
  free_.push_back(slot);
}

}  // namespace kvbuffer
