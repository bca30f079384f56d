#include "client/cpp/replica_router.h"

#include <algorithm>

namespace kvbuffer {
namespace {
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
const std::string kNone;
}  // namespace

ReplicaRouter::ReplicaRouter(std::vector<std::string> replicas, int virtual_nodes)
    : virtual_nodes_(std::max(1, virtual_nodes)) {
  SetReplicas(std::move(replicas));
}

uint64_t ReplicaRouter::Fnv1a64(std::string_view data) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : data) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}

uint64_t ReplicaRouter::Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t ReplicaRouter::KeyHash(uint64_t id) { return Mix64(id + kGamma); }

uint64_t ReplicaRouter::PointHash(std::string_view replica, int index) {
  return Mix64(Fnv1a64(replica) + (static_cast<uint64_t>(index) + 1) * kGamma);
}

bool ReplicaRouter::Add(const std::string& replica) {
  auto it = std::lower_bound(replicas_.begin(), replicas_.end(), replica);
  if (it != replicas_.end() && *it == replica) return false;
  replicas_.insert(it, replica);
  Rebuild();
  return true;
}

bool ReplicaRouter::Remove(const std::string& replica) {
  auto it = std::lower_bound(replicas_.begin(), replicas_.end(), replica);
  if (it == replicas_.end() || *it != replica) return false;
  replicas_.erase(it);
  Rebuild();
  return true;
}

void ReplicaRouter::SetReplicas(std::vector<std::string> replicas) {
  std::sort(replicas.begin(), replicas.end());
  replicas.erase(std::unique(replicas.begin(), replicas.end()), replicas.end());
  replicas_ = std::move(replicas);
  Rebuild();
}

void ReplicaRouter::Rebuild() {
  ring_.clear();
  ring_.reserve(replicas_.size() * static_cast<size_t>(virtual_nodes_));
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    const uint64_t base = Fnv1a64(replicas_[r]);
    for (int i = 0; i < virtual_nodes_; ++i) {
      ring_.emplace_back(Mix64(base + (static_cast<uint64_t>(i) + 1) * kGamma), r);
    }
  }
  // Ties (vanishingly rare) break by replica name, as in Python: indices follow sorted names.
  std::sort(ring_.begin(), ring_.end());
}

const std::string& ReplicaRouter::Route(uint64_t id) const {
  if (ring_.empty()) return kNone;
  const uint64_t key = KeyHash(id);
  auto it = std::lower_bound(ring_.begin(), ring_.end(), std::make_pair(key, uint32_t{0}));
  if (it == ring_.end()) it = ring_.begin();
  return replicas_[it->second];
}

std::map<std::string, std::vector<uint64_t>> ReplicaRouter::Partition(
    const std::vector<uint64_t>& ids) const {
  std::map<std::string, std::vector<uint64_t>> out;
  if (ring_.empty()) return out;
  for (uint64_t id : ids) out[Route(id)].push_back(id);
  return out;
}

std::vector<std::string> ReplicaRouter::replicas() const { return replicas_; }

}  // namespace kvbuffer
