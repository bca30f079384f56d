#include "service/engine/sequence_table.h"

#include <algorithm>

namespace kvbuffer {

int32_t Sequence::RowsNeeded() const {
  int32_t rows = 0;
  for (const LayerCursor& c : layers) rows = std::max(rows, c.buffer_rows + c.pending);
  return rows;
}

Sequence* SequenceTable::Find(const std::string& tenant, uint64_t id) {
  auto it = map_.find(Key(tenant, id));
  return it == map_.end() ? nullptr : it->second.get();
}

Sequence* SequenceTable::Insert(const std::string& tenant, uint64_t id) {
  auto seq = std::make_unique<Sequence>();
  seq->tenant = tenant;
  seq->id = id;
  Sequence* raw = seq.get();
  map_.emplace(Key(tenant, id), std::move(seq));
  ++per_tenant_[tenant];
  return raw;
}

void SequenceTable::Erase(const std::string& tenant, uint64_t id) {
  if (map_.erase(Key(tenant, id)) == 0) return;
  auto it = per_tenant_.find(tenant);
  if (--it->second == 0) per_tenant_.erase(it);
}

int32_t SequenceTable::CountTenant(const std::string& tenant) const {
  auto it = per_tenant_.find(tenant);
  return it == per_tenant_.end() ? 0 : it->second;
}

}  // namespace kvbuffer
