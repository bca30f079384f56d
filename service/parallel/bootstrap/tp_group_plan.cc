#include "service/parallel/bootstrap/tp_group_plan.h"

namespace kvbuffer::parallel {

PoolSizes PoolSizesOf(const EngineOptions& options) {
  PoolSizes sizes;
  sizes.state_slots = options.state_slots;
  sizes.buffer_pages = options.buffer_pages;
  sizes.page_tokens = options.page_tokens;
  sizes.conv_slots = options.max_sequences;
  sizes.max_drafts = options.max_drafts;
  sizes.buffer_dtype = options.buffer_dtype;
  sizes.conv_dtype = options.conv_dtype;
  return sizes;
}

}  // namespace kvbuffer::parallel
