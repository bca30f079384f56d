// Routing past one host: consistent hashing of sequence ids over replica addresses.
//
// A sequence's state lives on one replica, so every call for it must go there. The ring places
// `vnodes` points per replica; an id goes to the replica owning the first point at or after the
// id's hash, wrapping around. Removing a replica moves only the ids it owned; adding one moves
// only the ids it takes over (about 1/N of them).
//
// The hashing is shared with the Python client (kvbuffer.routing) so workers in both languages
// agree on where every sequence lives:
//   point(replica, i) = Mix64(Fnv1a64(replica) + (i + 1) * 0x9E3779B97F4A7C15), i = 0..vnodes-1
//   key(id)           = Mix64(id + 0x9E3779B97F4A7C15)
//   Mix64             = the SplitMix64 finalizer; arithmetic mod 2^64
// Replicas are identified by their address string as given ("host:port"): prefer the stable
// per-pod DNS names of a StatefulSet (kvbuffer-0.kvbuffer.ns.svc:50051) over pod IPs.
// Pure logic: no gRPC, no DNS, not thread-safe (guard it, or rebuild and swap on changes).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvbuffer {

class ReplicaRouter {
 public:
  static constexpr int kDefaultVirtualNodes = 160;

  explicit ReplicaRouter(std::vector<std::string> replicas = {},
                         int virtual_nodes = kDefaultVirtualNodes);

  // Adds a replica (no-op if present). Returns true if it was added.
  bool Add(const std::string& replica);
  // Removes a replica (no-op if absent). Returns true if it was removed.
  bool Remove(const std::string& replica);
  // Replaces the membership (e.g. after re-resolving a headless Service).
  void SetReplicas(std::vector<std::string> replicas);

  // The replica owning `id`; empty string when there is no replica.
  const std::string& Route(uint64_t id) const;

  // `ids` grouped by replica, each group in the given order.
  std::map<std::string, std::vector<uint64_t>> Partition(const std::vector<uint64_t>& ids) const;

  // Members, sorted.
  std::vector<std::string> replicas() const;
  size_t size() const { return replicas_.size(); }
  bool empty() const { return replicas_.empty(); }
  int virtual_nodes() const { return virtual_nodes_; }

  // The hash functions of the contract above (exposed for tests and other languages).
  static uint64_t Fnv1a64(std::string_view data);
  static uint64_t Mix64(uint64_t z);
  static uint64_t KeyHash(uint64_t id);
  static uint64_t PointHash(std::string_view replica, int index);

 private:
  void Rebuild();

  int virtual_nodes_;
  std::vector<std::string> replicas_;                 // sorted, unique
  std::vector<std::pair<uint64_t, uint32_t>> ring_;   // (point, index into replicas_), sorted
};

}  // namespace kvbuffer
