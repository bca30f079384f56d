// Client-side routing over replicas: every call is routed by sequence id with a ReplicaRouter
// (consistent hashing shared with the Python client's kvbuffer.routing), so each sequence's calls
// always reach the replica holding its state.
//
// Replicas come from a list ("host:port,host:port") or a DNS name ("dns:///name:port", e.g. the
// headless Service kvbuffer.ns.svc:50051) whose A/AAAA records become host:port replicas; call
// Resolve() again to pick up membership changes.
//
// A call naming sequences on several replicas is split into one call per replica (the rows of
// qkv, a and b going with their sequences), the calls are sent concurrently, and the outputs are
// re-assembled in request order. There is no cross-replica atomicity: when one replica's part
// fails, the other replicas' parts may have been applied. The returned status is then the first
// failing replica's (naming it and how many sequences it held), and RoutedReport says, per
// replica, which sequences it held, its status and (per-layer calls) its own outputs, so a caller
// can keep what succeeded and retry or abandon the rest.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/cpp/replica_router.h"
#include "kvbuffer/v1/attention_service.pb.h"

namespace kvbuffer::client {

// What one replica did with its part of a routed call.
struct ReplicaOutcome {
  std::string replica;          // "host:port"
  std::vector<size_t> indices;  // positions in the request of the sequences it held, in order
  std::vector<uint64_t> ids;    // those sequences' ids
  absl::Status status;
  v1::LayerOutput output;  // per-layer calls: its outputs, for `ids` in order (when OK)
};

// Per-replica outcomes of one routed call, in order of each replica's first sequence.
struct RoutedReport {
  std::vector<ReplicaOutcome> replicas;
};

// "host:port" replicas of `target`: a comma-separated list, or "dns:[//authority/]host:port"
// resolved now with getaddrinfo (A and AAAA records; IPv6 bracketed), sorted and deduplicated.
absl::StatusOr<std::vector<std::string>> ResolveReplicas(const std::string& target);

class RoutedClient {
 public:
  // A client of the replicas `target` names (see ResolveReplicas); INVALID_ARGUMENT or
  // UNAVAILABLE when it names none or cannot be resolved. A Client per replica uses `options`.
  static absl::StatusOr<std::unique_ptr<RoutedClient>> Connect(
      const std::string& target, ClientOptions options = {},
      int virtual_nodes = ReplicaRouter::kDefaultVirtualNodes);

  // Re-resolves a DNS target (a no-op for a list): the ring becomes the current records; clients
  // of replicas still present are kept. Only the ids of replicas that came or went move.
  absl::Status Resolve();

  // Adds or removes one replica by hand (e.g. one found dead); true if membership changed.
  bool AddReplica(const std::string& replica);
  bool RemoveReplica(const std::string& replica);

  // The current replicas, sorted; the replica `id` routes to ("" when there is none).
  std::vector<std::string> replicas() const;
  std::string ReplicaOf(uint64_t id) const;

  // The Client of `replica` (made on first use; null if it is not a member).
  std::shared_ptr<Client> ClientFor(const std::string& replica);

  // GetServerInfo of one replica (the first, sorted; `replica` to pick another).
  absl::StatusOr<v1::GetServerInfoResponse> GetServerInfo(const v1::GetServerInfoRequest& request,
                                                          const std::string& replica = "",
                                                          const CallOptions& call = {});

  // Lifecycle calls, split by replica (each part all-or-none on its replica only).
  absl::Status OpenSequences(absl::Span<const uint64_t> ids, const CallOptions& call = {},
                             RoutedReport* report = nullptr);
  absl::Status CloseSequences(absl::Span<const uint64_t> ids, const CallOptions& call = {},
                              RoutedReport* report = nullptr);
  absl::Status Flush(absl::Span<const uint64_t> ids, const CallOptions& call = {},
                     RoutedReport* report = nullptr);
  absl::Status CommitDrafts(const v1::CommitDraftsRequest& request, const CallOptions& call = {},
                            RoutedReport* report = nullptr);

  // Per-layer calls, split by replica; `response` gets the re-assembled outputs and positions in
  // request order when every part succeeded (replayed only if every part was replayed).
  absl::Status Prefill(const v1::PrefillRequest& request, v1::LayerOutput* response,
                       const CallOptions& call = {}, RoutedReport* report = nullptr);
  absl::Status DecodeStep(const v1::DecodeStepRequest& request, v1::LayerOutput* response,
                          const CallOptions& call = {}, RoutedReport* report = nullptr);
  absl::Status VerifyDrafts(const v1::VerifyDraftsRequest& request, v1::LayerOutput* response,
                            const CallOptions& call = {}, RoutedReport* report = nullptr);

 private:
  RoutedClient(std::string target, ClientOptions options, int virtual_nodes);

  // Groups request positions by the replica of ids[i], in order of first appearance.
  std::vector<ReplicaOutcome> Group(absl::Span<const uint64_t> ids) const;
  // Runs `part(outcome, client)` for every group concurrently (one thread per extra replica),
  // then combines the statuses.
  template <typename Part>
  absl::Status RunParts(std::vector<ReplicaOutcome> groups, Part part, RoutedReport* report);
  template <typename Request>
  absl::Status LayerCall(const Request& request, v1::LayerOutput* response, bool decode,
                         absl::Status (Client::*method)(const Request&, v1::LayerOutput*,
                                                        const CallOptions&),
                         const CallOptions& call, RoutedReport* report);
  absl::Status IdsCall(absl::Span<const uint64_t> ids,
                       absl::Status (Client::*method)(absl::Span<const uint64_t>,
                                                      const CallOptions&),
                       const CallOptions& call, RoutedReport* report);

  const std::string target_;
  const ClientOptions options_;
  mutable absl::Mutex mu_;
  ReplicaRouter router_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Client>> clients_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvbuffer::client
