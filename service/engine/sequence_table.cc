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
  return raw;
}

void SequenceTable::Erase(const std::string& tenant, uint64_t id) { map_.erase(Key(tenant, id)); }

}  // namespace kvbuffer
