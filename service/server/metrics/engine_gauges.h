// EngineInfo -> EngineGauges, for the server (which links the engine; kvb_metrics itself does
// not). Header-only.
#pragma once

#include "service/engine/engine.h"
#include "service/server/metrics/service_metrics.h"

namespace kvbuffer::metrics {

inline EngineGauges EngineGaugesFromInfo(const EngineInfo& i) {
  EngineGauges g;
  g.open_sequences = i.open_sequences;
  g.state_slots_free = i.free_state_slots;
  g.state_slots_used = i.options.state_slots - i.free_state_slots;
  g.buffer_pages_free = i.free_buffer_pages;
  g.buffer_pages_used = i.options.buffer_pages - i.free_buffer_pages;
  g.conv_slots_free = i.free_conv_slots;
  g.conv_slots_used = i.options.max_sequences - i.free_conv_slots;
  g.pool_bytes = i.memory.pool_bytes;
  g.device_total_bytes = i.memory.device_total_bytes;
  g.device_free_bytes = i.memory.device_free_bytes;
  g.flushes = i.flushes;
  g.drafts_verified = i.drafts_verified;
  g.drafts_accepted = i.drafts_accepted;
  return g;
}

}  // namespace kvbuffer::metrics
