// The sequence table: every open sequence's per-layer cursors and the pool resources it holds.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "kernels/reference/dtype.h"
#include "service/engine/backend.h"

namespace kvbuffer {

// Where one sequence stands on one layer.
struct LayerCursor {
  int64_t position = 0;      // committed tokens on this layer
  int32_t buffer_rows = 0;   // committed rows buffered since the layer's checkpoint
  int32_t pending = 0;       // tentative draft rows after them
  bool state_valid = false;  // the layer's part of the state slot holds its checkpoint
};

// The last per-layer call applied to a sequence, kept so that a retry is answered exactly once.
struct ReplayEntry {
  bool valid = false;
  StepKind kind = StepKind::kDecode;
  int32_t layer = 0;
  int64_t position = 0;  // committed position before the call
  int32_t num_tokens = 0;
  bool outputs_kept = false;
  DType out_dtype = DType::kFloat32;
  std::string out;  // the sequence's outputs, [num_tokens][HV][V] in out_dtype
};

// One open sequence.
struct Sequence {
  std::string tenant;
  uint64_t id = 0;
  std::vector<LayerCursor> layers;
  int32_t conv_slot = -1;
  int32_t state_slot = -1;  // allocated at the first fold of any layer
  std::vector<int32_t> pages;
  ReplayEntry replay;
  int64_t last_commit_position = -1;  // the last CommitDrafts applied, for its replay
  int32_t last_commit_accepted = -1;
  absl::Time last_used;

  // Rows the sequence's pages must hold: the largest committed + pending count of any layer.
  int32_t RowsNeeded() const;
};

// Open sequences keyed by (tenant, id).
class SequenceTable {
 public:
  using Key = std::pair<std::string, uint64_t>;

  // The sequence with this key, or nullptr.
  Sequence* Find(const std::string& tenant, uint64_t id);

  // Inserts a new sequence (the key must be absent) and returns it.
  Sequence* Insert(const std::string& tenant, uint64_t id);

  // Removes a sequence (the key must be present).
  void Erase(const std::string& tenant, uint64_t id);

  int32_t size() const { return static_cast<int32_t>(map_.size()); }
  // Open sequences of one tenant.
  int32_t CountTenant(const std::string& tenant) const;
  std::map<Key, std::unique_ptr<Sequence>>& all() { return map_; }

 private:
  std::map<Key, std::unique_ptr<Sequence>> map_;
  std::map<std::string, int32_t> per_tenant_;
};

}  // namespace kvbuffer
