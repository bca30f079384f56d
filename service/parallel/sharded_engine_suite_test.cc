// The engine's typed suite (fp64 oracle, retries, errors, admission) over 2 CPU shards: run one
// after another, concurrently (also checking activation values per shard), and as an in-process
// tensor-parallel group (rank 0 plus a worker thread over the in-process transport) with direct
// host steps and with every step through the protocol. The suite's "tiny" preset has H = 2, so N =
// 2 is its largest.
#include "service/engine/engine_test_suite.h"
#include "service/parallel/local_transport.h"
#include "service/parallel/sharded_backend.h"
#include "service/parallel/tp_backend.h"

namespace kvbuffer::testing {
namespace {

std::unique_ptr<Backend> MakeSharded2() {
  auto backend = parallel::MakeShardedCpuBackend(2);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::unique_ptr<Backend>(*std::move(backend)) : nullptr;
}

std::unique_ptr<Backend> MakeSharded2Concurrent() {
  parallel::ShardedBackendOptions o;
  o.num_shards = 2;
  o.concurrent = true;
  o.make_shard = [](int32_t) { return MakeCpuBackend(); };
  auto backend = parallel::ShardedBackend::Create(std::move(o));
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::unique_ptr<Backend>(*std::move(backend)) : nullptr;
}

std::unique_ptr<Backend> MakeSharded2Checking() {
  parallel::ShardedBackendOptions o;
  o.num_shards = 2;
  o.concurrent = true;
  o.check_values_in_shards = true;
  o.make_shard = [](int32_t) { return MakeCpuBackend(); };
  auto backend = parallel::ShardedBackend::Create(std::move(o));
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::unique_ptr<Backend>(*std::move(backend)) : nullptr;
}

std::unique_ptr<Backend> MakeTp2(bool direct) {
  std::vector<std::unique_ptr<parallel::ShardCompute>> computes;
  computes.push_back(parallel::MakeInPlaceShardCompute(MakeCpuBackend()));
  computes.push_back(parallel::MakeStagedShardCompute(MakeCpuBackend()));
  parallel::TpOptions o;
  o.command_bytes = 2 << 10;  // small: exercises the inline and the scattered paths
  o.direct_host_steps = direct;
  auto backend = parallel::MakeInProcessTpBackend(parallel::MakeLocalTransports(2),
                                                  std::move(computes), std::move(o));
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::unique_ptr<Backend>(*std::move(backend)) : nullptr;
}

INSTANTIATE_TEST_SUITE_P(Sharded2, EngineSuite, ::testing::Values(&MakeSharded2));
INSTANTIATE_TEST_SUITE_P(Sharded2Concurrent, EngineSuite,
                         ::testing::Values(&MakeSharded2Concurrent));
INSTANTIATE_TEST_SUITE_P(Sharded2Checking, EngineSuite, ::testing::Values(&MakeSharded2Checking));
std::unique_ptr<Backend> MakeTp2Direct() { return MakeTp2(true); }
std::unique_ptr<Backend> MakeTp2Protocol() { return MakeTp2(false); }
INSTANTIATE_TEST_SUITE_P(TpInProcess2Direct, EngineSuite, ::testing::Values(&MakeTp2Direct));
INSTANTIATE_TEST_SUITE_P(TpInProcess2Protocol, EngineSuite, ::testing::Values(&MakeTp2Protocol));

}  // namespace
}  // namespace kvbuffer::testing
