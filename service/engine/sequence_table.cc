#include "service/engine/sequence_table.h"

#include <algorithm>

namespace kvbuffer {

int32_t Sequence::RowsNeeded() const {
  int32_t rows = 0;
  for (const LayerCursor& c : layers) rows = std::max(rows, c.buffer_rows + c.pending);
  return rows;
}

Sequence* SequenceTable::Find(const std::string& tenant, uint64_t id) {
  return Find(Tenant(tenant), id);
}

const SequenceTable::TenantIds* SequenceTable::Tenant(const std::string& tenant) const {
  auto it = index_.find(tenant);
  return it == index_.end() ? nullptr : &it->second;
}

Sequence* SequenceTable::Insert(const std::string& tenant, uint64_t id) {
  auto seq = std::make_unique<Sequence>();
  seq->tenant = tenant;
  seq->id = id;
  Sequence* raw = seq.get();
  map_.emplace(Key(tenant, id), std::move(seq));
  index_[tenant][id] = raw;
  return raw;
}

void SequenceTable::Erase(const std::string& tenant, uint64_t id) {
  if (map_.erase(Key(tenant, id)) == 0) return;
  auto it = index_.find(tenant);
  it->second.erase(id);
  if (it->second.empty()) index_.erase(it);
}

int32_t SequenceTable::CountTenant(const std::string& tenant) const {
  const TenantIds* ids = Tenant(tenant);
  return ids == nullptr ? 0 : static_cast<int32_t>(ids->size());
}

}  // namespace kvbuffer
