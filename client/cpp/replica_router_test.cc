// ReplicaRouter: the hashing contract shared with Python (golden values), stable mapping, balance,
// and minimal movement when replicas leave or join.
#include "client/cpp/replica_router.h"

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvbuffer {
namespace {

const std::vector<std::string> kThree = {"kvbuffer-0.kvbuffer:50051", "kvbuffer-1.kvbuffer:50051",
                                         "kvbuffer-2.kvbuffer:50051"};

TEST(ReplicaRouterTest, HashesMatchTheSharedContract) {
  // The same values are asserted by client/python/tests/test_routing.py.
  EXPECT_EQ(ReplicaRouter::Fnv1a64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(ReplicaRouter::Fnv1a64("kvbuffer-0.kvbuffer:50051"), 0x6fa29daf7a068d17ull);
  EXPECT_EQ(ReplicaRouter::KeyHash(0), 0xe220a8397b1dcdafull);  // SplitMix64(0).Next()
  EXPECT_EQ(ReplicaRouter::KeyHash(42), 0xbdd732262feb6e95ull);
  EXPECT_EQ(ReplicaRouter::PointHash("a:1", 0), 0xd097563b758a8ce2ull);
  ReplicaRouter router(kThree);
  const std::string want = "012100102100011110121120";  // replica index of ids 0..23
  for (uint64_t id = 0; id < want.size(); ++id) {
    EXPECT_EQ(router.Route(id), kThree[want[id] - '0']) << "id " << id;
  }
}

TEST(ReplicaRouterTest, EmptyRouterRoutesNowhere) {
  ReplicaRouter router;
  EXPECT_TRUE(router.empty());
  EXPECT_EQ(router.Route(7), "");
  EXPECT_TRUE(router.Partition({1, 2, 3}).empty());
}

TEST(ReplicaRouterTest, MappingIsStableAndOrderIndependent) {
  ReplicaRouter a(kThree);
  ReplicaRouter b({kThree[2], kThree[0], kThree[1], kThree[0]});  // order and duplicates ignored
  EXPECT_EQ(b.size(), 3u);
  for (uint64_t id = 0; id < 5000; ++id) {
    EXPECT_EQ(a.Route(id), b.Route(id));
    EXPECT_EQ(a.Route(id), a.Route(id));
  }
}

TEST(ReplicaRouterTest, SpreadsIdsEvenly) {
  std::vector<std::string> replicas;
  for (int i = 0; i < 8; ++i) replicas.push_back("10.0.0." + std::to_string(i + 1) + ":50051");
  ReplicaRouter router(replicas);
  std::map<std::string, int> count;
  constexpr int kIds = 80000;
  for (uint64_t id = 0; id < kIds; ++id) ++count[router.Route(id * 7919 + 13)];
  ASSERT_EQ(count.size(), 8u);
  for (const auto& [r, n] : count) {
    EXPECT_GT(n, kIds / 8 * 0.75) << r;
    EXPECT_LT(n, kIds / 8 * 1.25) << r;
  }
}

TEST(ReplicaRouterTest, RemovingAReplicaMovesOnlyItsIds) {
  ReplicaRouter router(kThree);
  std::vector<std::string> before;
  for (uint64_t id = 0; id < 10000; ++id) before.push_back(router.Route(id));
  ASSERT_TRUE(router.Remove(kThree[1]));
  EXPECT_FALSE(router.Remove(kThree[1]));
  int moved = 0;
  for (uint64_t id = 0; id < 10000; ++id) {
    const std::string& now = router.Route(id);
    EXPECT_NE(now, kThree[1]);
    if (before[id] != kThree[1]) {
      EXPECT_EQ(now, before[id]) << "id " << id << " moved though its replica stayed";
    } else {
      ++moved;
    }
  }
  EXPECT_GT(moved, 2000);  // about a third
  EXPECT_LT(moved, 4700);
}

TEST(ReplicaRouterTest, AddingAReplicaTakesOnlyItsShare) {
  ReplicaRouter router(kThree);
  std::vector<std::string> before;
  for (uint64_t id = 0; id < 10000; ++id) before.push_back(router.Route(id));
  ASSERT_TRUE(router.Add("kvbuffer-3.kvbuffer:50051"));
  EXPECT_FALSE(router.Add("kvbuffer-3.kvbuffer:50051"));
  int moved = 0;
  for (uint64_t id = 0; id < 10000; ++id) {
    const std::string& now = router.Route(id);
    if (now != before[id]) {
      EXPECT_EQ(now, "kvbuffer-3.kvbuffer:50051") << "id " << id << " moved between old replicas";
      ++moved;
    }
  }
  EXPECT_GT(moved, 1500);  // about a quarter
  EXPECT_LT(moved, 3500);
  router.SetReplicas(kThree);  // back to the original membership: original mapping
  for (uint64_t id = 0; id < 10000; ++id) EXPECT_EQ(router.Route(id), before[id]);
}

TEST(ReplicaRouterTest, PartitionsKeepOrderPerReplica) {
  ReplicaRouter router(kThree);
  std::vector<uint64_t> ids;
  for (uint64_t i = 100; i > 0; --i) ids.push_back(i * 31);
  const auto groups = router.Partition(ids);
  size_t total = 0;
  for (const auto& [replica, group] : groups) {
    total += group.size();
    size_t last = 0;
    for (uint64_t id : group) {
      EXPECT_EQ(router.Route(id), replica);
      const size_t pos = static_cast<size_t>(std::find(ids.begin(), ids.end(), id) - ids.begin());
      EXPECT_GE(pos, last);
      last = pos;
    }
  }
  EXPECT_EQ(total, ids.size());
}

}  // namespace
}  // namespace kvbuffer
