// The gRPC bootstrap on 127.0.0.1: ranks handed out once each, retried Joins answered the same,
// refusals with their codes, the plan carried whole.
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "service/parallel/bootstrap/bootstrap_service.h"
#include "service/parallel/tp_protocol.h"

namespace kvbuffer::parallel {
namespace {

TpGroupPlan Plan(int32_t world) {
  TpGroupPlan p;
  p.nccl_unique_id = std::string(128, '\x5a');
  p.world_size = world;
  EXPECT_TRUE(ModelPreset("qwen3-next-80b-a3b", &p.model));
  p.model.param_seed = 77;
  p.pools.state_slots = 10;
  p.pools.buffer_pages = 20;
  p.pools.page_tokens = 4;
  p.pools.conv_slots = 30;
  p.pools.max_drafts = 3;
  p.pools.buffer_dtype = DType::kBFloat16;
  p.pools.conv_dtype = DType::kFloat32;
  p.protocol.command_bytes = 32 << 10;
  p.protocol.op_timeout = absl::Seconds(7);
  p.protocol.idle_timeout = absl::Seconds(9);
  p.protocol.heartbeat_interval = absl::Milliseconds(500);
  p.init_timeout = absl::Seconds(11);
  p.shard_backend = "cpu";
  return p;
}

TpJoinRequest Request(const std::string& id, int32_t rank = 0) {
  TpJoinRequest r;
  r.worker_id = id;
  r.requested_rank = rank;
  return r;
}

TEST(BootstrapTest, HandsOutEveryRankOnceAndCarriesThePlan) {
  auto server = BootstrapServer::Start("127.0.0.1:0", Plan(3));
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());
  EXPECT_EQ((*server)->service().WaitForAllRanks(absl::Milliseconds(10)).code(),
            absl::StatusCode::kDeadlineExceeded);
  auto a = JoinTpGroup(target, Request("a"), absl::Seconds(10));
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = JoinTpGroup(target, Request("b"), absl::Seconds(10));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->rank, 1);
  EXPECT_EQ(b->rank, 2);
  EXPECT_TRUE((*server)->service().WaitForAllRanks(absl::Seconds(1)).ok());
  // A retried Join gets the same rank; a newcomer finds no rank left.
  auto again = JoinTpGroup(target, Request("a"), absl::Seconds(10));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->rank, 1);
  EXPECT_EQ(JoinTpGroup(target, Request("c"), absl::Seconds(10)).status().code(),
            absl::StatusCode::kResourceExhausted);
  // The plan arrives whole.
  const TpGroupPlan want = Plan(3);
  const TpGroupPlan& got = a->plan;
  EXPECT_EQ(got.nccl_unique_id, want.nccl_unique_id);
  EXPECT_EQ(got.world_size, 3);
  EXPECT_EQ(got.model, want.model);
  EXPECT_EQ(got.pools.state_slots, 10);
  EXPECT_EQ(got.pools.buffer_pages, 20);
  EXPECT_EQ(got.pools.page_tokens, 4);
  EXPECT_EQ(got.pools.conv_slots, 30);
  EXPECT_EQ(got.pools.max_drafts, 3);
  EXPECT_EQ(got.pools.buffer_dtype, DType::kBFloat16);
  EXPECT_EQ(got.pools.conv_dtype, DType::kFloat32);
  EXPECT_EQ(got.protocol.command_bytes, 32u << 10);
  EXPECT_EQ(got.protocol.op_timeout, absl::Seconds(7));
  EXPECT_EQ(got.protocol.idle_timeout, absl::Seconds(9));
  EXPECT_EQ(got.protocol.heartbeat_interval, absl::Milliseconds(500));
  EXPECT_EQ(got.init_timeout, absl::Seconds(11));
  EXPECT_EQ(got.shard_backend, "cpu");
  const std::vector<std::string> members = (*server)->service().Members();
  EXPECT_EQ(members[1], "a");
  EXPECT_EQ(members[2], "b");
}

TEST(BootstrapTest, RequestedRanksAndRefusals) {
  auto server = BootstrapServer::Start("127.0.0.1:0", Plan(4));
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());
  auto x = JoinTpGroup(target, Request("x", 3), absl::Seconds(10));
  ASSERT_TRUE(x.ok()) << x.status();
  EXPECT_EQ(x->rank, 3);
  EXPECT_EQ(JoinTpGroup(target, Request("y", 3), absl::Seconds(10)).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(JoinTpGroup(target, Request("y", 4), absl::Seconds(10)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(JoinTpGroup(target, Request(""), absl::Seconds(10)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto y = JoinTpGroup(target, Request("y"), absl::Seconds(10));
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(y->rank, 1);
  // A worker of another build is refused.
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = kvbuffer::v1::TensorParallelBootstrap::NewStub(channel);
  grpc::ClientContext ctx;
  kvbuffer::v1::JoinRequest req;
  req.set_worker_id("z");
  req.set_protocol_layout(kTpLayout ^ 1);
  kvbuffer::v1::JoinResponse resp;
  EXPECT_EQ(stub->Join(&ctx, req, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST(BootstrapTest, WorkerWaitsForALateLeader) {
  // Pick a free port, then start the server on it only after the worker began trying.
  int port = 0;
  {
    auto probe = BootstrapServer::Start("127.0.0.1:0", Plan(2));
    ASSERT_TRUE(probe.ok());
    port = (*probe)->port();
  }
  const std::string target = "127.0.0.1:" + std::to_string(port);
  absl::StatusOr<TpJoinGrant> grant = absl::UnknownError("not run");
  std::thread worker([&] { grant = JoinTpGroup(target, Request("late"), absl::Seconds(20)); });
  absl::SleepFor(absl::Milliseconds(500));
  auto server = BootstrapServer::Start(target, Plan(2));
  ASSERT_TRUE(server.ok()) << server.status();
  worker.join();
  ASSERT_TRUE(grant.ok()) << grant.status();
  EXPECT_EQ(grant->rank, 1);
}

TEST(BootstrapTest, GivesUpWhenNoLeaderComes) {
  const absl::Time start = absl::Now();
  auto grant = JoinTpGroup("127.0.0.1:1", Request("lonely"), absl::Seconds(1));
  EXPECT_FALSE(grant.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(15));
}

}  // namespace
}  // namespace kvbuffer::parallel
