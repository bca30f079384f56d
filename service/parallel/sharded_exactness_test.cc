// N simulated CPU shards equal one CPU backend EXACTLY: two engines, one over a plain CpuBackend
// and one over N CPU shards, get the same calls with fresh random inputs; every output is compared
// with memcmp and, after every call, every layer of every state slot too. The shards are driven
// by a ShardedBackend (host slicing) or by the tensor-parallel protocol (TpBackend, rank 0, with
// worker threads over the in-process transport; small command blocks force the multi-round
// paths).
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "service/engine/engine.h"
#include "service/parallel/local_transport.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/sharded_backend.h"
#include "service/parallel/tp_backend.h"
#include "service/parallel/twin_engines.h"

namespace kvbuffer::parallel {
namespace {

// kTpDevice: a device-step function (here: sync, then compute on host memory) as the CudaBackend
// extension would plug in; kTpDeviceUnimplemented: one that answers UNIMPLEMENTED, so the shard
// falls back to staging.
enum class Kind {
  kSharded,
  kShardedConcurrent,
  kTpInPlace,
  kTpStaged,
  kTpDevice,
  kTpDeviceUnimplemented
};

struct Param {
  int32_t n = 2;
  DType pool_dtype = DType::kFloat32;  // buffer and conv dtype
  Kind kind = Kind::kSharded;
  size_t command_bytes = 64 << 10;  // TpBackend's command block
};

// The backend under test over n CPU shards.
std::unique_ptr<Backend> MakeShardedUnderTest(const Param& p) {
  if (p.kind == Kind::kSharded || p.kind == Kind::kShardedConcurrent) {
    ShardedBackendOptions so;
    so.num_shards = p.n;
    so.concurrent = p.kind == Kind::kShardedConcurrent;
    so.make_shard = [](int32_t) { return MakeCpuBackend(); };
    auto b = ShardedBackend::Create(std::move(so));
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::unique_ptr<Backend>(*std::move(b)) : nullptr;
  }
  std::vector<std::unique_ptr<TpTransport>> transports = MakeLocalTransports(p.n);
  std::vector<std::unique_ptr<ShardCompute>> computes;
  for (int32_t r = 0; r < p.n; ++r) {
    TpTransport* t = transports[r].get();
    switch (p.kind) {
      case Kind::kTpStaged:
        computes.push_back(MakeStagedShardCompute(MakeCpuBackend()));
        break;
      case Kind::kTpDevice:
        computes.push_back(
            MakeDeviceShardCompute(MakeCpuBackend(), [t](Backend& b, const LayerStep& step, void*) {
              if (absl::Status s = t->Sync(absl::Seconds(30)); !s.ok()) return s;
              return b.RunLayerStep(step);
            }));
        break;
      case Kind::kTpDeviceUnimplemented:
        computes.push_back(
            MakeDeviceShardCompute(MakeCpuBackend(), [](Backend&, const LayerStep&, void*) {
              return absl::UnimplementedError("no device entry point");
            }));
        break;
      default:
        computes.push_back(MakeInPlaceShardCompute(MakeCpuBackend()));
        break;
    }
  }
  TpOptions o;
  o.command_bytes = p.command_bytes;
  o.heartbeat_interval = absl::Milliseconds(50);
  o.op_timeout = absl::Seconds(30);
  auto b = MakeInProcessTpBackend(std::move(transports), std::move(computes), std::move(o));
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::unique_ptr<Backend>(*std::move(b)) : nullptr;
}

class ShardedExactnessTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    twin_.Init(testing::TwinOptions(GetParam().pool_dtype), MakeCpuBackend(),
               MakeShardedUnderTest(GetParam()));
  }
  testing::TwinEngines twin_;
};

TEST_P(ShardedExactnessTest, PrefillShortStatelessAndChunkedThenDecode) {
  twin_.PrefillShortStatelessAndChunkedThenDecode();
}

TEST_P(ShardedExactnessTest, VerifyAndCommitEveryAcceptCount) {
  twin_.VerifyAndCommitEveryAcceptCount();
}

TEST_P(ShardedExactnessTest, FlushStatelessAndReopenedSequences) {
  twin_.FlushStatelessAndReopenedSequences();
}

TEST_P(ShardedExactnessTest, EveryActivationAndOutputDtype) {
  twin_.EveryActivationAndOutputDtype();
}

TEST_P(ShardedExactnessTest, RetriedCallsReplayIdentically) {
  twin_.Open({1});
  ASSERT_NO_FATAL_FAILURE(twin_.Step(StepKind::kPrefill, {{1, 5}}));
  // The same call twice: the second is a replay on both engines.
  const ModelConfig& m = twin_.options().model;
  const std::string qkv = twin_.Random(m.channels(), DType::kFloat32);
  const std::string a = twin_.Random(m.num_v_heads, DType::kFloat32);
  const std::string b = twin_.Random(m.num_v_heads, DType::kFloat32);
  LayerCall call;
  call.layer = 0;
  call.sequences = {{1, twin_.Position(1, 0), 1}};
  call.qkv = {DType::kFloat32, {1, m.channels()}, qkv.data(), qkv.size()};
  call.a = {DType::kFloat32, {1, m.num_v_heads}, a.data(), a.size()};
  call.b = {DType::kFloat32, {1, m.num_v_heads}, b.data(), b.size()};
  for (int i = 0; i < 2; ++i) {
    auto want = twin_.ref()->DecodeStep(call);
    auto got = twin_.tp()->DecodeStep(call);
    ASSERT_TRUE(want.ok() && got.ok());
    EXPECT_EQ(want->replayed, i == 1);
    EXPECT_EQ(got->replayed, i == 1);
    EXPECT_EQ(want->out.bytes, got->out.bytes);
  }
  twin_.CompareStates();
}

TEST_P(ShardedExactnessTest, MemoryIsTheSameInTotalAndOneNthPerShard) {
  const int32_t n = GetParam().n;
  const BackendMemory want = twin_.ref_backend()->Memory();
  const BackendMemory got = twin_.tp_backend()->Memory();
  EXPECT_EQ(got.pool_bytes, want.pool_bytes);
  if (auto* sharded = dynamic_cast<ShardedBackend*>(twin_.tp_backend())) {
    for (int32_t s = 0; s < n; ++s) {
      EXPECT_EQ(sharded->shard_backend(s)->Memory().pool_bytes * n, want.pool_bytes);
    }
  }
  EXPECT_EQ(twin_.tp()->Info().backend, "cpu-tp" + std::to_string(n));
}

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  const Param& p = info.param;
  static const char* const kNames[] = {"Sharded",  "ShardedConcurrent", "TpInPlace",
                                       "TpStaged", "TpDevice",          "TpDeviceUnimplemented"};
  const bool tp = p.kind != Kind::kSharded && p.kind != Kind::kShardedConcurrent;
  return std::string(kNames[static_cast<int>(p.kind)]) + "_N" + std::to_string(p.n) + "_" +
         DTypeName(p.pool_dtype) + (tp ? "_block" + std::to_string(p.command_bytes) : "");
}

INSTANTIATE_TEST_SUITE_P(
    Shards, ShardedExactnessTest,
    ::testing::Values(Param{1, DType::kFloat32, Kind::kSharded},
                      Param{2, DType::kFloat32, Kind::kSharded},
                      Param{4, DType::kFloat32, Kind::kSharded},
                      Param{2, DType::kBFloat16, Kind::kSharded},
                      Param{2, DType::kFloat32, Kind::kShardedConcurrent},
                      Param{4, DType::kBFloat16, Kind::kShardedConcurrent},
                      // Tensor-parallel protocol: everything inline, metadata inline but inputs
                      // scattered, and everything in round B.
                      Param{2, DType::kFloat32, Kind::kTpInPlace, 64 << 10},
                      Param{4, DType::kFloat32, Kind::kTpInPlace, 4 << 10},
                      Param{4, DType::kBFloat16, Kind::kTpInPlace, 512},
                      Param{2, DType::kFloat32, Kind::kTpStaged, 1 << 10},
                      Param{2, DType::kFloat32, Kind::kTpDevice, 4 << 10},
                      Param{2, DType::kBFloat16, Kind::kTpDeviceUnimplemented, 4 << 10},
                      Param{1, DType::kFloat32, Kind::kTpInPlace, 4 << 10}),
    ParamName);

}  // namespace
}  // namespace kvbuffer::parallel
