// N simulated CPU shards equal one CPU backend EXACTLY: two engines, one over a plain CpuBackend
// and one over N CPU shards, get the same calls with fresh random inputs; every output is compared
// with memcmp and, after every call, every layer of every state slot too. The shards are driven
// by a ShardedBackend (host slicing) or by the tensor-parallel protocol (TpBackend, rank 0, with
// worker threads over the in-process transport; small command blocks force the multi-round
// paths).
#include <cmath>
#include <cstring>
#include <limits>
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
// kShardedChecking: concurrent shards that check activation values themselves; kTpDirect: an
// in-process group whose host steps go straight to every rank's backend (TpOptions::
// direct_host_steps); the other Tp kinds take the NCCL-style protocol for steps too.
enum class Kind {
  kSharded,
  kShardedConcurrent,
  kTpInPlace,
  kTpStaged,
  kTpDevice,
  kTpDeviceUnimplemented,
  kShardedChecking,
  kTpDirect
};

struct Param {
  int32_t n = 2;
  DType pool_dtype = DType::kFloat32;  // buffer and conv dtype
  Kind kind = Kind::kSharded;
  size_t command_bytes = 64 << 10;  // TpBackend's command block
  size_t max_block_bytes = 0;       // how far rank 0 may grow it (0: never, keep the rounds)
  int32_t lanes = 0;                // copy threads per shard of direct/checking steps (0: default)
};

// The backend under test over n CPU shards.
std::unique_ptr<Backend> MakeShardedUnderTest(const Param& p) {
  if (p.kind == Kind::kSharded || p.kind == Kind::kShardedConcurrent ||
      p.kind == Kind::kShardedChecking) {
    ShardedBackendOptions so;
    so.num_shards = p.n;
    so.concurrent = p.kind != Kind::kSharded;
    so.check_values_in_shards = p.kind == Kind::kShardedChecking;
    so.copy_threads = p.lanes;
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
  o.max_block_bytes = p.max_block_bytes;
  o.heartbeat_interval = absl::Milliseconds(50);
  o.op_timeout = absl::Seconds(30);
  o.direct_host_steps = p.kind == Kind::kTpDirect;
  o.direct_copy_threads = p.lanes;
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
  static const char* const kNames[] = {
      "Sharded",  "ShardedConcurrent",     "TpInPlace",       "TpStaged",
      "TpDevice", "TpDeviceUnimplemented", "ShardedChecking", "TpDirect"};
  const bool tp = p.kind != Kind::kSharded && p.kind != Kind::kShardedConcurrent &&
                  p.kind != Kind::kShardedChecking;
  return std::string(kNames[static_cast<int>(p.kind)]) + "_N" + std::to_string(p.n) + "_" +
         DTypeName(p.pool_dtype) + (tp ? "_block" + std::to_string(p.command_bytes) : "") +
         (p.max_block_bytes > p.command_bytes ? "_grow" + std::to_string(p.max_block_bytes) : "") +
         (p.lanes > 0 ? "_lanes" + std::to_string(p.lanes) : "");
}

INSTANTIATE_TEST_SUITE_P(
    Shards, ShardedExactnessTest,
    ::testing::Values(Param{1, DType::kFloat32, Kind::kSharded},
                      Param{2, DType::kFloat32, Kind::kSharded},
                      Param{4, DType::kFloat32, Kind::kSharded},
                      Param{2, DType::kBFloat16, Kind::kSharded},
                      Param{2, DType::kFloat32, Kind::kShardedConcurrent},
                      Param{4, DType::kBFloat16, Kind::kShardedConcurrent},
                      Param{2, DType::kFloat32, Kind::kShardedChecking},
                      Param{4, DType::kBFloat16, Kind::kShardedChecking, 0, 0, 3},
                      // Direct host steps of an in-process group (folds, commits and reads
                      // still take the protocol).
                      Param{2, DType::kFloat32, Kind::kTpDirect, 4 << 10},
                      Param{4, DType::kBFloat16, Kind::kTpDirect, 512},
                      Param{2, DType::kFloat32, Kind::kTpDirect, 4 << 10, 0, 4},
                      Param{1, DType::kFloat32, Kind::kTpDirect, 4 << 10},
                      // Tensor-parallel protocol: everything inline, metadata inline but inputs
                      // scattered, and everything in round B.
                      Param{2, DType::kFloat32, Kind::kTpInPlace, 64 << 10},
                      Param{4, DType::kFloat32, Kind::kTpInPlace, 4 << 10},
                      Param{4, DType::kBFloat16, Kind::kTpInPlace, 512},
                      Param{2, DType::kFloat32, Kind::kTpStaged, 1 << 10},
                      Param{2, DType::kFloat32, Kind::kTpDevice, 4 << 10},
                      Param{2, DType::kBFloat16, Kind::kTpDeviceUnimplemented, 4 << 10},
                      Param{1, DType::kFloat32, Kind::kTpInPlace, 4 << 10},
                      // A block that grows to take the recent steps' inputs inline (and shrinks
                      // back at heartbeats) from a window too small for them.
                      Param{2, DType::kFloat32, Kind::kTpDevice, 1 << 10, 1 << 20},
                      Param{4, DType::kBFloat16, Kind::kTpInPlace, 512, 1 << 20}),
    ParamName);

// Backends that check activation values per shard refuse exactly what the engine refuses, with
// the engine's message (the first bad element of qkv, then a, then b, counted in the full
// tensors), whichever shard holds the bad value, and change nothing: the next steps stay exact.
class ShardValueCheckTest : public ::testing::TestWithParam<Param> {};

TEST_P(ShardValueCheckTest, RefusesLikeTheEngineAndChangesNothing) {
  testing::TwinEngines twin;
  twin.Init(testing::TwinOptions(DType::kFloat32), MakeCpuBackend(),
            MakeShardedUnderTest(GetParam()));
  ASSERT_TRUE(twin.tp_backend()->ChecksActivationValues());
  const ModelConfig& m = twin.options().model;
  twin.Open({1, 2, 3});
  twin.Step(StepKind::kPrefill, {{1, 9}, {2, 3}, {3, 7}});  // states and buffers on every seq
  const int32_t kc = m.num_k_heads * m.head_k_dim;
  // (tensor, element) of the bad value in a 3-token decode call: q of the first key head, k of
  // the last, v of the last value head (the last shard), and a and b of several heads.
  const std::vector<std::pair<int, int64_t>> places = {
      {0, 5},
      {0, 2 * m.channels() + kc + kc - 1},
      {0, m.channels() + 2 * kc + m.num_v_heads * m.head_v_dim - 3},
      {1, 1 * m.num_v_heads + m.num_v_heads - 1},
      {2, 2 * m.num_v_heads},
      {1, 0}};
  const float values[] = {std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::infinity(), -2.0f * kMaxActivationMagnitude,
                          kMaxActivationMagnitude};
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (const auto& [tensor, element] : places) {
      for (float bad : values) {
        if (dtype == DType::kFloat16 && std::isfinite(bad)) continue;  // FP16 cannot hold them
        SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " tensor " << tensor << " element "
                                          << element << " value " << bad);
        const int64_t T = 3;
        std::string x[3] = {twin.Random(T * m.channels(), dtype),
                            twin.Random(T * m.num_v_heads, dtype),
                            twin.Random(T * m.num_v_heads, dtype)};
        StoreFromFloat(x[tensor].data(), dtype, element, bad);
        // A second bad value later in qkv must not win over the first one in order.
        if (tensor == 0) StoreFromFloat(x[0].data(), dtype, T * m.channels() - 1, bad);
        LayerCall call;
        call.layer = 1;
        for (uint64_t id : {1, 2, 3}) call.sequences.push_back({id, twin.Position(id, 1), 1});
        call.qkv = {dtype, {T, m.channels()}, x[0].data(), x[0].size()};
        call.a = {dtype, {T, m.num_v_heads}, x[1].data(), x[1].size()};
        call.b = {dtype, {T, m.num_v_heads}, x[2].data(), x[2].size()};
        call.out_dtype = DType::kFloat32;
        const absl::Status want = twin.ref()->DecodeStep(call).status();
        const absl::Status got = twin.tp()->DecodeStep(call).status();
        ASSERT_EQ(want.code(), absl::StatusCode::kInvalidArgument) << want;
        EXPECT_EQ(got, want);
      }
    }
  }
  twin.CompareStates();
  // Nothing changed: both engines continue exactly.
  for (int i = 0; i < 5; ++i) {
    twin.Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}}, DType::kBFloat16, DType::kFloat32);
  }
  twin.CompareStates();
}

INSTANTIATE_TEST_SUITE_P(
    Shards, ShardValueCheckTest,
    ::testing::Values(Param{2, DType::kFloat32, Kind::kShardedChecking},
                      Param{4, DType::kFloat32, Kind::kShardedChecking, 0, 0, 2},
                      Param{2, DType::kFloat32, Kind::kTpDirect, 64 << 10, 0, 3},
                      Param{4, DType::kFloat32, Kind::kTpDirect}),
    ParamName);

// TpBackend takes the activations from wherever they are: separate caller buffers, one buffer of
// its own laid out as the engine stages them (one transfer), or its own memory laid out otherwise;
// and writes outputs into caller memory or straight into its own. Every placement equals one CPU
// backend bit for bit, outputs and state.
TEST(TpBackendPlacementTest, ActivationsAndOutputsFromAnyPlacementMatchOneBackend) {
  const EngineOptions o = testing::TwinOptions(DType::kFloat32);
  const ModelConfig& m = o.model;
  PoolSizes sizes;
  sizes.state_slots = 2;
  sizes.buffer_pages = 8;
  sizes.page_tokens = o.page_tokens;
  sizes.conv_slots = 2;
  sizes.max_drafts = o.max_drafts;
  const std::vector<LayerParams> params = MakeAllLayerParams(m);
  std::unique_ptr<Backend> ref = MakeCpuBackend();
  std::unique_ptr<Backend> tp = MakeShardedUnderTest(Param{2, DType::kFloat32, Kind::kTpInPlace});
  ASSERT_NE(tp, nullptr);
  ASSERT_TRUE(ref->Allocate(m, params, sizes).ok());
  ASSERT_TRUE(tp->Allocate(m, params, sizes).ok());
  const std::vector<int32_t> slots = {0};
  ASSERT_TRUE(ref->ResetConv(slots).ok());
  ASSERT_TRUE(tp->ResetConv(slots).ok());

  constexpr int32_t kTokens = 3;  // one prefill item, kept in the buffer
  const size_t qkv_bytes = size_t{kTokens} * m.channels() * sizeof(float);
  const size_t ab_bytes = size_t{kTokens} * m.num_v_heads * sizeof(float);
  const size_t out_bytes = size_t{kTokens} * m.out_elems() * sizeof(float);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  const std::vector<int32_t> pages = {0, 1};
  for (int placement = 0; placement < 3; ++placement) {
    SCOPED_TRACE(placement);
    std::vector<float> x(qkv_bytes / 4 + 2 * ab_bytes / 4);
    for (float& v : x) v = nd(rng);
    // 0: caller memory; 1: the backend's memory as the engine stages it; 2: the backend's memory,
    // a and b swapped and out in the same buffer.
    const size_t a_at = (qkv_bytes + 255) / 256 * 256, b_at = a_at + (ab_bytes + 255) / 256 * 256;
    uint8_t* own =
        placement == 0
            ? nullptr
            : static_cast<uint8_t*>(tp->AllocateHostBuffer(b_at + ab_bytes + 256 + out_bytes));
    std::vector<uint8_t> caller(b_at + ab_bytes), caller_out(out_bytes);
    uint8_t* base = own != nullptr ? own : caller.data();
    const size_t qkv_at = 0, at_a = placement == 2 ? b_at : a_at,
                 at_b = placement == 2 ? a_at : b_at;
    std::memcpy(base + qkv_at, x.data(), qkv_bytes);
    std::memcpy(base + at_a, x.data() + qkv_bytes / 4, ab_bytes);
    std::memcpy(base + at_b, x.data() + (qkv_bytes + ab_bytes) / 4, ab_bytes);
    StepItem item;
    item.num_tokens = kTokens;
    item.buffer_rows = 0;
    item.conv_slot = 0;
    item.num_pages = 2;
    LayerStep step;
    step.layer = placement % m.num_layers;
    step.kind = StepKind::kPrefill;
    step.items = std::span<const StepItem>(&item, 1);
    step.page_table = pages;
    step.qkv = base + qkv_at;
    step.a = base + at_a;
    step.b = base + at_b;
    step.total_tokens = kTokens;
    std::vector<uint8_t> want(out_bytes);
    step.out = want.data();
    ASSERT_TRUE(ref->RunLayerStep(step).ok());
    step.out = placement == 2 ? own + b_at + ab_bytes + 256 : caller_out.data();
    ASSERT_TRUE(tp->RunLayerStep(step).ok());
    EXPECT_EQ(std::memcmp(step.out, want.data(), out_bytes), 0);
    if (own != nullptr) tp->FreeHostBuffer(own);
  }
}

}  // namespace
}  // namespace kvbuffer::parallel
