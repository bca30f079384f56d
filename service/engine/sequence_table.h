// The sequence table: every open sequence's per-layer cursors and the pool resources it holds.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
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

// Host memory the engine owns and pools (engine.cc): the outputs of one applied per-layer call,
// [total_tokens][HV][V] in its out_dtype, shared by the replay records of the call's sequences;
// or a call's activations staged for the backend.
struct HostBlock {
  uint8_t* data = nullptr;
  size_t capacity = 0;
  bool backend_memory = false;  // from Backend::AllocateHostBuffer
  int32_t refs = 0;             // replay records pointing into it
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
  // The sequence's outputs, [num_tokens][HV][V] in out_dtype: out_bytes bytes at out_offset of
  // `block` (one reference of it) when outputs_kept.
  HostBlock* block = nullptr;
  size_t out_offset = 0;
  size_t out_bytes = 0;
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
  uint64_t visit = 0;  // stamp of the last call that looked it up (repeated-id checks)

  // Rows the sequence's pages must hold: the largest committed + pending count of any layer.
  int32_t RowsNeeded() const;
};

// Open sequences keyed by (tenant, id): ordered for listing, hashed per tenant for lookups.
class SequenceTable {
 public:
  using Key = std::pair<std::string, uint64_t>;
  // One tenant's open sequences by id.
  using TenantIds = absl::flat_hash_map<uint64_t, Sequence*>;

  // The sequence with this key, or nullptr.
  Sequence* Find(const std::string& tenant, uint64_t id);

  // The open sequences of `tenant`, or nullptr if it has none (valid until the next Insert/Erase).
  const TenantIds* Tenant(const std::string& tenant) const;

  // The sequence `id` of a tenant from Tenant() (nullptr tenant: none), or nullptr.
  static Sequence* Find(const TenantIds* ids, uint64_t id) {
    if (ids == nullptr) return nullptr;
    auto it = ids->find(id);
    return it == ids->end() ? nullptr : it->second;
  }

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
  absl::flat_hash_map<std::string, TenantIds> index_;
};

}  // namespace kvbuffer
