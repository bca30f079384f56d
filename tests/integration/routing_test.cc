// Client-side routing over three in-process replicas (client/cpp/routed_client.h): sequences
// spread over all of them, every output checked against its fp64 oracle through split and
// re-assembled calls; then one replica goes away: its sequences report UNAVAILABLE (NOT_FOUND
// once it is removed from the ring and their ids move), while the others go on and still match.
#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/cpp/routed_client.h"
#include "client/mock_worker/checked_sequence.h"
#include "client/mock_worker/layer_calls.h"
#include "client/mock_worker/mock_session.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/reference/layer_params.h"
#include "tests/integration/test_servers.h"

namespace kvbuffer::testing {
namespace {

using mock::CheckedSequence;
using mock::LayerKind;
using ::testing::HasSubstr;

// Drives checked sequences through a RoutedClient, one call per layer, outputs checked.
class RoutedDriver {
 public:
  explicit RoutedDriver(client::RoutedClient* routed) : routed_(routed) {}

  absl::Status Init() {
    absl::StatusOr<v1::GetServerInfoResponse> info = routed_->GetServerInfo({});
    if (!info.ok()) return info.status();
    const v1::ModelShapes& m = info->model();
    config_.name = m.name();
    config_.num_layers = m.num_layers();
    config_.num_k_heads = m.num_k_heads();
    config_.num_v_heads = m.num_v_heads();
    config_.head_k_dim = m.head_k_dim();
    config_.head_v_dim = m.head_v_dim();
    config_.conv_width = m.conv_width();
    config_.param_seed = m.param_seed();
    params_ = MakeAllLayerParams(config_);
    calls_ = std::make_unique<mock::LayerCalls>(config_, DType::kBFloat16, DType::kFloat32, 7);
    return absl::OkStatus();
  }

  CheckedSequence* NewSequence(uint64_t id) {
    seqs_.push_back(std::make_unique<CheckedSequence>(id, config_, &params_));
    return seqs_.back().get();
  }

  // Prefill (tokens[i] per sequence) or decode on every layer, every output checked; the first
  // failure (a call's status, or an error beyond 1e-5) is returned.
  absl::Status Step(LayerKind kind, const std::vector<CheckedSequence*>& seqs,
                    const std::vector<int32_t>& tokens, client::RoutedReport* report = nullptr) {
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      v1::LayerOutput out;
      absl::Status s;
      if (kind == LayerKind::kPrefill) {
        v1::PrefillRequest request;
        calls_->Fill(layer, seqs, tokens, &request);
        s = routed_->Prefill(request, &out, {}, report);
      } else {
        v1::DecodeStepRequest request;
        calls_->Fill(layer, seqs, tokens, &request);
        client::CallOptions once;
        once.max_attempts = 1;
        s = routed_->DecodeStep(request, &out, once, report);
      }
      if (!s.ok()) return s;
      std::vector<double> errors;
      if (s = calls_->Check(kind, layer, seqs, tokens, out, &errors); !s.ok()) return s;
      for (size_t i = 0; i < errors.size(); ++i) {
        max_error = std::max(max_error, errors[i]);
        if (!(errors[i] <= 1e-5)) {
          return absl::InternalError(absl::StrCat("layer ", layer, " sequence ", seqs[i]->id(),
                                                  ": relative error ", errors[i]));
        }
      }
      checks += static_cast<int64_t>(errors.size());
    }
    return absl::OkStatus();
  }

  absl::Status Decode(const std::vector<CheckedSequence*>& seqs,
                      client::RoutedReport* report = nullptr) {
    return Step(LayerKind::kDecode, seqs, std::vector<int32_t>(seqs.size(), 1), report);
  }

  double max_error = 0;
  int64_t checks = 0;

 private:
  client::RoutedClient* routed_;
  ModelConfig config_;
  std::vector<LayerParams> params_;
  std::unique_ptr<mock::LayerCalls> calls_;
  std::vector<std::unique_ptr<CheckedSequence>> seqs_;
};

std::vector<uint64_t> IdsOf(const std::vector<CheckedSequence*>& seqs) {
  std::vector<uint64_t> ids;
  for (const CheckedSequence* s : seqs) ids.push_back(s->id());
  return ids;
}

TEST(ResolveReplicasTest, ListsAndDnsNames) {
  absl::StatusOr<std::vector<std::string>> list = client::ResolveReplicas("b:2, a:1,[::1]:3,a:1");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(*list, (std::vector<std::string>{"[::1]:3", "a:1", "b:2"}));
  EXPECT_FALSE(client::ResolveReplicas("noport").ok());
  EXPECT_FALSE(client::ResolveReplicas("").ok());
  EXPECT_FALSE(client::ResolveReplicas("dns:///localhost").ok());

  absl::StatusOr<std::vector<std::string>> dns = client::ResolveReplicas("dns:///localhost:50051");
  ASSERT_TRUE(dns.ok()) << dns.status();
  ASSERT_FALSE(dns->empty());
  for (const std::string& r : *dns) {
    EXPECT_TRUE(r == "127.0.0.1:50051" || r == "[::1]:50051") << r;
  }
  absl::StatusOr<std::vector<std::string>> ip = client::ResolveReplicas("dns:127.0.0.1:7");
  ASSERT_TRUE(ip.ok());
  EXPECT_EQ(*ip, std::vector<std::string>{"127.0.0.1:7"});
}

TEST(RoutedClientTest, SplitsCallsOverThreeReplicasAndSurvivesOneGoingAway) {
  std::vector<std::unique_ptr<InProcessServer>> servers;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    servers.push_back(InProcessServer::Start());
    addresses.push_back(servers.back()->address());
  }
  client::ClientOptions options;
  options.timeout = absl::Seconds(30);
  absl::StatusOr<std::unique_ptr<client::RoutedClient>> routed =
      client::RoutedClient::Connect(absl::StrJoin(addresses, ","), options);
  ASSERT_TRUE(routed.ok()) << routed.status();
  client::RoutedClient& rc = **routed;
  ASSERT_EQ(rc.replicas().size(), 3u);

  RoutedDriver driver(&rc);
  ASSERT_TRUE(driver.Init().ok());
  std::vector<CheckedSequence*> all;
  std::map<std::string, std::vector<CheckedSequence*>> by_replica;
  for (uint64_t id = 5000; id < 5024; ++id) {
    all.push_back(driver.NewSequence(id));
    by_replica[rc.ReplicaOf(id)].push_back(all.back());
  }
  ASSERT_EQ(by_replica.size(), 3u) << "24 ids should spread over all three replicas";

  client::RoutedReport report;
  ASSERT_TRUE(rc.OpenSequences(IdsOf(all), {}, &report).ok());
  EXPECT_EQ(report.replicas.size(), 3u);
  for (int i = 0; i < 3; ++i) {  // each server holds exactly the ids routed to it
    EXPECT_EQ(servers[i]->engine()->Info().open_sequences,
              static_cast<int32_t>(by_replica[addresses[i]].size()))
        << addresses[i];
  }

  std::vector<int32_t> prompt;
  for (size_t i = 0; i < all.size(); ++i) prompt.push_back(1 + static_cast<int32_t>(i % 5));
  ASSERT_TRUE(driver.Step(LayerKind::kPrefill, all, prompt).ok());
  for (int step = 0; step < 3; ++step) {
    absl::Status s = driver.Decode(all);
    ASSERT_TRUE(s.ok()) << s;
  }
  ASSERT_TRUE(rc.Flush(IdsOf(all)).ok());
  ASSERT_TRUE(driver.Decode(all).ok());

  // Replica 1 goes away.
  const std::string gone = addresses[1];
  servers[1]->server()->Shutdown(absl::ZeroDuration());
  servers[1].reset();
  std::vector<CheckedSequence*> lost = by_replica[gone], kept;
  for (CheckedSequence* s : all) {
    if (rc.ReplicaOf(s->id()) != gone) kept.push_back(s);
  }

  // A batch over all three: the lost replica's part fails, the others' parts are applied.
  client::CallOptions once;
  once.max_attempts = 1;
  absl::Status flush = rc.Flush(IdsOf(all), once, &report);
  EXPECT_EQ(flush.code(), absl::StatusCode::kUnavailable) << flush;
  EXPECT_THAT(std::string(flush.message()), HasSubstr(gone));
  ASSERT_EQ(report.replicas.size(), 3u);
  for (const client::ReplicaOutcome& r : report.replicas) {
    if (r.replica == gone) {
      EXPECT_EQ(r.status.code(), absl::StatusCode::kUnavailable);
      EXPECT_EQ(r.ids.size(), lost.size());
    } else {
      EXPECT_TRUE(r.status.ok()) << r.replica << ": " << r.status;
    }
  }
  // The lost sequences report UNAVAILABLE; the others go on and still match their oracles.
  absl::Status lost_decode = driver.Decode({lost[0]});
  EXPECT_EQ(lost_decode.code(), absl::StatusCode::kUnavailable) << lost_decode;
  for (int step = 0; step < 2; ++step) {
    absl::Status s = driver.Decode(kept);
    ASSERT_TRUE(s.ok()) << s;
  }

  // Removed from the ring, the lost ids move to the survivors, which do not know them.
  ASSERT_TRUE(rc.RemoveReplica(gone));
  EXPECT_EQ(rc.replicas().size(), 2u);
  for (CheckedSequence* s : lost) EXPECT_NE(rc.ReplicaOf(s->id()), gone);
  for (CheckedSequence* s : kept) {  // consistent hashing: only the lost ids moved
    EXPECT_NE(rc.ReplicaOf(s->id()), gone);
  }
  absl::Status moved = driver.Decode({lost[0]});
  EXPECT_EQ(moved.code(), absl::StatusCode::kNotFound) << moved;
  ASSERT_TRUE(driver.Decode(kept).ok());
  EXPECT_TRUE(rc.CloseSequences(IdsOf(kept)).ok());
  EXPECT_GT(driver.checks, 0);
  EXPECT_LE(driver.max_error, 1e-5);
}

TEST(RoutedClientTest, MockWorkerRoutesOverServers) {
  std::vector<std::unique_ptr<InProcessServer>> servers;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    servers.push_back(InProcessServer::Start());
    addresses.push_back(servers.back()->address());
  }
  mock::MockSessionOptions o;
  o.servers = absl::StrJoin(addresses, ",");
  o.concurrency = 2;
  o.sequences = 6;
  o.batch = 4;
  o.steps = 3;
  o.max_prompt = 6;
  o.seed = 11;
  absl::StatusOr<mock::MockSessionReport> report = mock::RunMockSession(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << report->first_error << report->first_mismatch;
  EXPECT_GT(report->checks, 0);
  o.mode = "stream";
  EXPECT_FALSE(mock::RunMockSession(o).ok());  // routing is unary only
}

}  // namespace
}  // namespace kvbuffer::testing
