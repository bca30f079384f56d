#include "client/cpp/routed_client.h"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvbuffer::client {

namespace {

// Splits "host:port" or "[v6]:port"; false when there is no port.
bool SplitHostPort(absl::string_view target, std::string* host, std::string* port) {
  if (absl::StartsWith(target, "[")) {
    const size_t close = target.find(']');
    if (close == absl::string_view::npos || close + 1 >= target.size() ||
        target[close + 1] != ':') {
      return false;
    }
    *host = std::string(target.substr(1, close - 1));
    *port = std::string(target.substr(close + 2));
  } else {
    const size_t colon = target.rfind(':');
    if (colon == absl::string_view::npos) return false;
    *host = std::string(target.substr(0, colon));
    *port = std::string(target.substr(colon + 1));
  }
  int unused;
  return !host->empty() && absl::SimpleAtoi(*port, &unused);
}

// The DNS name of a "dns:" target ("dns:host:port", "dns:///host:port", "dns://auth/host:port").
bool DnsName(absl::string_view target, absl::string_view* name) {
  if (!absl::ConsumePrefix(&target, "dns:")) return false;
  if (absl::ConsumePrefix(&target, "//")) {
    const size_t slash = target.find('/');
    target = slash == absl::string_view::npos ? absl::string_view() : target.substr(slash + 1);
  }
  *name = target;
  return true;
}

// Rows of `t` for sequences whose row ranges (offset, count) are in `ranges`, appended to `out`.
absl::Status CopyRows(const v1::Tensor& t, const std::vector<std::pair<int64_t, int64_t>>& ranges,
                      int64_t total_rows, const char* field, v1::Tensor* out) {
  if (t.shape_size() == 0 || t.shape(0) != total_rows || t.data().size() % total_rows != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": cannot split its rows by sequence (shape[0] must be the ",
                     total_rows, " tokens of the call)"));
  }
  const size_t row_bytes = t.data().size() / total_rows;
  out->set_dtype(t.dtype());
  int64_t rows = 0;
  std::string* data = out->mutable_data();
  for (const auto& [offset, count] : ranges) {
    data->append(t.data(), offset * row_bytes, count * row_bytes);
    rows += count;
  }
  out->add_shape(rows);
  for (int d = 1; d < t.shape_size(); ++d) out->add_shape(t.shape(d));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveReplicas(const std::string& target) {
  std::vector<std::string> out;
  absl::string_view name;
  if (DnsName(target, &name)) {
    std::string host, port;
    if (!SplitHostPort(name, &host, &port)) {
      return absl::InvalidArgumentError(
          absl::StrCat("DNS target must be dns:///host:port, got \"", target, "\""));
    }
    addrinfo hints;
    std::memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* result = nullptr;
    const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &result);
    if (rc != 0) {
      return absl::UnavailableError(absl::StrCat("resolving ", host, ": ", gai_strerror(rc)));
    }
    for (addrinfo* a = result; a != nullptr; a = a->ai_next) {
      char text[NI_MAXHOST];
      if (getnameinfo(a->ai_addr, a->ai_addrlen, text, sizeof(text), nullptr, 0, NI_NUMERICHOST) !=
          0) {
        continue;
      }
      out.push_back(a->ai_family == AF_INET6 ? absl::StrCat("[", text, "]:", port)
                                             : absl::StrCat(text, ":", port));
    }
    freeaddrinfo(result);
  } else {
    for (absl::string_view part : absl::StrSplit(target, ',', absl::SkipWhitespace())) {
      part = absl::StripAsciiWhitespace(part);
      std::string host, port;
      if (!SplitHostPort(part, &host, &port)) {
        return absl::InvalidArgumentError(
            absl::StrCat("replica must be host:port, got \"", part, "\""));
      }
      out.emplace_back(part);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  if (out.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("no replicas in \"", target, "\""));
  }
  return out;
}

RoutedClient::RoutedClient(std::string target, ClientOptions options, int virtual_nodes)
    : target_(std::move(target)), options_(std::move(options)), router_({}, virtual_nodes) {}

absl::StatusOr<std::unique_ptr<RoutedClient>> RoutedClient::Connect(const std::string& target,
                                                                    ClientOptions options,
                                                                    int virtual_nodes) {
  std::unique_ptr<RoutedClient> c(new RoutedClient(target, std::move(options), virtual_nodes));
  if (absl::Status s = c->Resolve(); !s.ok()) return s;
  return c;
}

absl::Status RoutedClient::Resolve() {
  absl::StatusOr<std::vector<std::string>> replicas = ResolveReplicas(target_);
  if (!replicas.ok()) return replicas.status();
  absl::MutexLock lock(&mu_);
  router_.SetReplicas(*replicas);
  for (auto it = clients_.begin(); it != clients_.end();) {
    it = std::binary_search(replicas->begin(), replicas->end(), it->first) ? std::next(it)
                                                                           : clients_.erase(it);
  }
  return absl::OkStatus();
}

bool RoutedClient::AddReplica(const std::string& replica) {
  absl::MutexLock lock(&mu_);
  return router_.Add(replica);
}

bool RoutedClient::RemoveReplica(const std::string& replica) {
  absl::MutexLock lock(&mu_);
  clients_.erase(replica);
  return router_.Remove(replica);
}

std::vector<std::string> RoutedClient::replicas() const {
  absl::MutexLock lock(&mu_);
  return router_.replicas();
}

std::string RoutedClient::ReplicaOf(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  return router_.Route(id);
}

std::shared_ptr<Client> RoutedClient::ClientFor(const std::string& replica) {
  absl::MutexLock lock(&mu_);
  const std::vector<std::string> members = router_.replicas();
  if (!std::binary_search(members.begin(), members.end(), replica)) return nullptr;
  std::shared_ptr<Client>& c = clients_[replica];
  if (!c) c = Client::Connect(replica, options_);
  return c;
}

absl::StatusOr<v1::GetServerInfoResponse> RoutedClient::GetServerInfo(
    const v1::GetServerInfoRequest& request, const std::string& replica, const CallOptions& call) {
  std::string target = replica;
  if (target.empty()) {
    const std::vector<std::string> members = replicas();
    if (members.empty()) return absl::UnavailableError("no replicas");
    target = members.front();
  }
  std::shared_ptr<Client> c = ClientFor(target);
  if (!c) return absl::NotFoundError(absl::StrCat(target, " is not a replica"));
  return c->GetServerInfo(request, call);
}

std::vector<ReplicaOutcome> RoutedClient::Group(absl::Span<const uint64_t> ids) const {
  std::vector<ReplicaOutcome> groups;
  std::map<std::string, size_t> index;
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string& replica = router_.Route(ids[i]);
    auto [it, added] = index.emplace(replica, groups.size());
    if (added) {
      groups.emplace_back();
      groups.back().replica = replica;
    }
    groups[it->second].indices.push_back(i);
    groups[it->second].ids.push_back(ids[i]);
  }
  return groups;
}

template <typename Part>
absl::Status RoutedClient::RunParts(std::vector<ReplicaOutcome> groups, Part part,
                                    RoutedReport* report) {
  auto run = [&](ReplicaOutcome& g) {
    std::shared_ptr<Client> c = g.replica.empty() ? nullptr : ClientFor(g.replica);
    g.status = c ? part(g, c.get()) : absl::UnavailableError("no replica for these sequences");
  };
  std::vector<std::thread> threads;
  for (size_t i = 1; i < groups.size(); ++i) threads.emplace_back(run, std::ref(groups[i]));
  if (!groups.empty()) run(groups[0]);
  for (std::thread& t : threads) t.join();

  absl::Status first;
  int failed = 0;
  size_t total = 0;
  for (const ReplicaOutcome& g : groups) total += g.ids.size();
  for (const ReplicaOutcome& g : groups) {
    if (g.status.ok()) continue;
    if (failed++ == 0) {
      first = absl::Status(
          g.status.code(),
          absl::StrCat("replica ", g.replica.empty() ? "(none)" : g.replica, " (", g.ids.size(),
                       " of ", total, " sequences): ", g.status.message()));
    }
  }
  if (failed > 0 && groups.size() > 1) {
    first = absl::Status(
        first.code(),
        absl::StrCat(first.message(), "; ", failed, " of ", groups.size(),
                     " replicas failed, the others' parts were applied (no cross-replica "
                     "atomicity; see the RoutedReport)"));
  }
  if (report != nullptr) report->replicas = std::move(groups);
  return failed == 0 ? absl::OkStatus() : first;
}

absl::Status RoutedClient::IdsCall(absl::Span<const uint64_t> ids,
                                   absl::Status (Client::*method)(absl::Span<const uint64_t>,
                                                                  const CallOptions&),
                                   const CallOptions& call, RoutedReport* report) {
  return RunParts(
      Group(ids), [&](ReplicaOutcome& g, Client* c) { return (c->*method)(g.ids, call); }, report);
}

absl::Status RoutedClient::OpenSequences(absl::Span<const uint64_t> ids, const CallOptions& call,
                                         RoutedReport* report) {
  return IdsCall(ids, &Client::OpenSequences, call, report);
}

absl::Status RoutedClient::CloseSequences(absl::Span<const uint64_t> ids, const CallOptions& call,
                                          RoutedReport* report) {
  return IdsCall(ids, &Client::CloseSequences, call, report);
}

absl::Status RoutedClient::Flush(absl::Span<const uint64_t> ids, const CallOptions& call,
                                 RoutedReport* report) {
  return IdsCall(ids, &Client::Flush, call, report);
}

absl::Status RoutedClient::CommitDrafts(const v1::CommitDraftsRequest& request,
                                        const CallOptions& call, RoutedReport* report) {
  std::vector<uint64_t> ids;
  for (const v1::CommitItem& item : request.items()) ids.push_back(item.id());
  return RunParts(
      Group(ids),
      [&](ReplicaOutcome& g, Client* c) {
        v1::CommitDraftsRequest part;
        for (size_t i : g.indices) *part.add_items() = request.items(static_cast<int>(i));
        return c->CommitDrafts(part, call);
      },
      report);
}

template <typename Request>
absl::Status RoutedClient::LayerCall(const Request& request, v1::LayerOutput* response, bool decode,
                                     absl::Status (Client::*method)(const Request&,
                                                                    v1::LayerOutput*,
                                                                    const CallOptions&),
                                     const CallOptions& call, RoutedReport* report) {
  std::vector<uint64_t> ids;
  std::vector<int64_t> offsets;  // first row of each sequence
  int64_t total_rows = 0;
  for (const v1::SequenceTokens& s : request.sequences()) {
    ids.push_back(s.id());
    offsets.push_back(total_rows);
    total_rows += (decode && s.num_tokens() == 0) ? 1 : s.num_tokens();
  }
  std::vector<ReplicaOutcome> groups = Group(ids);
  if (groups.size() == 1) {  // one replica: the request goes as it is
    return RunParts(
        std::move(groups),
        [&](ReplicaOutcome& g, Client* c) {
          absl::Status s = (c->*method)(request, response, call);
          if (s.ok() && report != nullptr) g.output = *response;
          return s;
        },
        report);
  }
  RoutedReport local;
  RoutedReport* r = report != nullptr ? report : &local;
  auto rows_of = [&](size_t i) {
    const int64_t end = i + 1 < offsets.size() ? offsets[i + 1] : total_rows;
    return std::make_pair(offsets[i], end - offsets[i]);
  };
  absl::Status status = RunParts(
      std::move(groups),
      [&](ReplicaOutcome& g, Client* c) -> absl::Status {
        Request part;
        part.set_layer(request.layer());
        part.set_output_dtype(request.output_dtype());
        std::vector<std::pair<int64_t, int64_t>> ranges;
        for (size_t i : g.indices) {
          *part.add_sequences() = request.sequences(static_cast<int>(i));
          ranges.push_back(rows_of(i));
        }
        if (absl::Status s = CopyRows(request.qkv(), ranges, total_rows, "qkv", part.mutable_qkv());
            !s.ok()) {
          return s;
        }
        if (absl::Status s = CopyRows(request.a(), ranges, total_rows, "a", part.mutable_a());
            !s.ok()) {
          return s;
        }
        if (absl::Status s = CopyRows(request.b(), ranges, total_rows, "b", part.mutable_b());
            !s.ok()) {
          return s;
        }
        return (c->*method)(part, &g.output, call);
      },
      r);
  if (!status.ok()) return status;
  // Re-assemble: every part's rows back at their sequences' places.
  response->Clear();
  v1::Tensor* out = response->mutable_output();
  const v1::Tensor& first = r->replicas[0].output.output();
  if (first.shape_size() == 0) return absl::InternalError("a replica answered without outputs");
  out->set_dtype(first.dtype());
  out->add_shape(total_rows);
  for (int d = 1; d < first.shape_size(); ++d) out->add_shape(first.shape(d));
  const int64_t part_rows0 = first.shape(0);
  if (part_rows0 <= 0) return absl::InternalError("a replica answered with no rows");
  const size_t row_bytes = first.data().size() / part_rows0;
  std::string* data = out->mutable_data();
  data->assign(row_bytes * total_rows, '\0');
  response->mutable_positions()->Resize(static_cast<int>(ids.size()), 0);
  bool replayed = true;
  for (const ReplicaOutcome& g : r->replicas) {
    const v1::Tensor& t = g.output.output();
    if (t.dtype() != first.dtype() || t.shape_size() != first.shape_size() ||
        t.data().size() != row_bytes * t.shape(0) ||
        g.output.positions_size() != static_cast<int>(g.indices.size())) {
      return absl::InternalError(
          absl::StrCat("replica ", g.replica, " answered outputs of another layout"));
    }
    size_t from = 0;
    for (size_t k = 0; k < g.indices.size(); ++k) {
      const auto [offset, count] = rows_of(g.indices[k]);
      if ((from + count) * row_bytes > t.data().size()) {
        return absl::InternalError(absl::StrCat("replica ", g.replica, " answered too few rows"));
      }
      std::memcpy(data->data() + offset * row_bytes, t.data().data() + from * row_bytes,
                  count * row_bytes);
      from += count;
      response->set_positions(static_cast<int>(g.indices[k]),
                              g.output.positions(static_cast<int>(k)));
    }
    replayed = replayed && g.output.replayed();
  }
  response->set_replayed(replayed);
  return absl::OkStatus();
}

absl::Status RoutedClient::Prefill(const v1::PrefillRequest& request, v1::LayerOutput* response,
                                   const CallOptions& call, RoutedReport* report) {
  return LayerCall(request, response, false, &Client::Prefill, call, report);
}

absl::Status RoutedClient::DecodeStep(const v1::DecodeStepRequest& request,
                                      v1::LayerOutput* response, const CallOptions& call,
                                      RoutedReport* report) {
  return LayerCall(request, response, true, &Client::DecodeStep, call, report);
}

absl::Status RoutedClient::VerifyDrafts(const v1::VerifyDraftsRequest& request,
                                        v1::LayerOutput* response, const CallOptions& call,
                                        RoutedReport* report) {
  return LayerCall(request, response, false, &Client::VerifyDrafts, call, report);
}

}  // namespace kvbuffer::client
