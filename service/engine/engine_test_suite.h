// The engine's typed test suite: every operation against the fp64 oracle, retries, errors that
// change nothing, admission, reclaim. Instantiated per backend (CPU in engine_test.cc, CUDA in
// tests/gpu) with INSTANTIATE_TEST_SUITE_P(Name, EngineSuite, ::testing::Values(&Factory)).
#pragma once

#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "service/engine/engine.h"
#include "service/engine/engine_test_driver.h"

namespace kvbuffer {

// Prints a backend factory as a stable word, so that parameterised test names (and the ctest
// names derived from them) do not carry a pointer value that changes from run to run.
inline void PrintTo(std::unique_ptr<Backend> (*)(), std::ostream* os) { *os << "backend"; }

}  // namespace kvbuffer

namespace kvbuffer::testing {

// Makes a backend for one test, or nullptr to skip (e.g. no GPU).
using BackendFactory = std::unique_ptr<Backend> (*)();

// Relative error every fp32 configuration must meet against the fp64 oracle.
inline constexpr double kTolerance = 1e-5;

class EngineSuite : public ::testing::TestWithParam<BackendFactory> {
 protected:
  // Options of a small, fast engine: C = 4 so that flushes come often, stateless limit 6.
  static EngineOptions SmallOptions() {
    EngineOptions o;
    ModelPreset("tiny", &o.model);
    o.flush_interval = 4;
    o.stateless_limit = 6;
    o.max_drafts = 4;
    o.max_sequences = 64;
    o.state_slots = 64;
    o.buffer_pages = 512;
    o.page_tokens = 2;
    return o;
  }

  // Creates the engine under test (skipping when the backend is unavailable).
  std::unique_ptr<Engine> MakeEngine(EngineOptions o) {
    std::unique_ptr<Backend> backend = GetParam()();
    if (backend == nullptr) return nullptr;
    auto engine = Engine::Create(std::move(o), std::move(backend));
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? std::move(*engine) : nullptr;
  }

  static uint32_t Seed() {
    return static_cast<uint32_t>(std::random_device{}());  // fresh inputs on every run
  }
};

#define KVB_ENGINE_OR_SKIP(var, options)                               \
  std::unique_ptr<Engine> var = MakeEngine(options);                   \
  if (var == nullptr) GTEST_SKIP() << "backend unavailable on this machine"

TEST_P(EngineSuite, DecodeMatchesOracleAcrossThreeFlushes) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2});
  // 6 stateless tokens, then flushes every 4: 30 tokens cross the stateless limit and 6 folds.
  for (int step = 0; step < 30; ++step) {
    ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {2, 1}}), kTolerance) << "step " << step;
  }
  EXPECT_GE(engine->Info().flushes, 3 * 2 * d.config().num_layers);
}

TEST_P(EngineSuite, EveryDtypeOfActivationsMatchesOracle) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  d.Open({1});
  for (DType t : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 5}}, t), kTolerance) << DTypeName(t);
    for (int i = 0; i < 5; ++i) ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}}, t), kTolerance);
  }
}

TEST_P(EngineSuite, VerifyEveryAcceptCountThenContinueDecoding) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  const int32_t m = 4;
  for (int32_t accept = 0; accept <= m; ++accept) {
    const uint64_t id = 100 + accept;
    d.Open({id});
    ASSERT_LE(d.Step(StepKind::kPrefill, {{id, 3 + accept}}), kTolerance);
    for (int round = 0; round < 4; ++round) {  // crosses the stateless limit and flushes
      ASSERT_LE(d.Step(StepKind::kVerify, {{id, m}}), kTolerance);
      ASSERT_TRUE(d.Commit({{id, accept}}).ok());
      ASSERT_LE(d.Step(StepKind::kDecode, {{id, 1}}), kTolerance) << "accept " << accept;
    }
  }
  EXPECT_EQ(engine->Info().drafts_verified, 5 * 4 * m * d.config().num_layers);
}

TEST_P(EngineSuite, RejectEverythingThenDecodeKeepsConvWindowAndState) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  d.Open({7});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{7, 9}}), kTolerance);  // stateful, 1 buffered row
  for (int i = 0; i < 3; ++i) {
    ASSERT_LE(d.Step(StepKind::kVerify, {{7, 4}}), kTolerance);
    ASSERT_TRUE(d.Commit({{7, 0}}).ok());
  }
  // The conv window must be the one before the drafts: the next outputs prove it.
  for (int i = 0; i < 6; ++i) ASSERT_LE(d.Step(StepKind::kDecode, {{7, 1}}), kTolerance);
}

TEST_P(EngineSuite, StatelessUntilFirstFoldThenStateful) {
  EngineOptions o = SmallOptions();
  KVB_ENGINE_OR_SKIP(engine, o);
  EngineDriver d(engine.get(), Seed());
  d.Open({3});
  for (int i = 0; i < o.stateless_limit; ++i) {
    ASSERT_LE(d.Step(StepKind::kDecode, {{3, 1}}), kTolerance);
    auto info = engine->Describe("", 3);
    ASSERT_TRUE(info.ok());
    EXPECT_FALSE(info->has_state) << "after " << i + 1 << " tokens";
  }
  EXPECT_EQ(engine->Info().free_state_slots, o.state_slots);
  ASSERT_LE(d.Step(StepKind::kDecode, {{3, 1}}), kTolerance);
  auto info = engine->Describe("", 3);
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->has_state);
  EXPECT_EQ(engine->Info().free_state_slots, o.state_slots - 1);
  for (int i = 0; i < 10; ++i) ASSERT_LE(d.Step(StepKind::kDecode, {{3, 1}}), kTolerance);
}

TEST_P(EngineSuite, PrefillEveryLengthTo300ThenDecodeAndVerify) {
  EngineOptions o = SmallOptions();
  o.flush_interval = 16;
  o.stateless_limit = 64;
  o.max_sequences = 320;
  o.state_slots = 320;
  o.buffer_pages = 4096;
  o.page_tokens = 16;
  KVB_ENGINE_OR_SKIP(engine, o);
  EngineDriver d(engine.get(), Seed());
  // Batches of ragged lengths so that all of 1..300 are covered.
  for (int32_t first = 1; first <= 300; first += 25) {
    std::vector<std::pair<uint64_t, int32_t>> batch, ones, drafts, accept;
    std::vector<uint64_t> ids;
    for (int32_t len = first; len < first + 25 && len <= 300; ++len) {
      ids.push_back(len);
      batch.push_back({len, len});
      ones.push_back({len, 1});
      drafts.push_back({len, 3});
      accept.push_back({len, len % 4});
    }
    d.Open(ids);
    ASSERT_LE(d.Step(StepKind::kPrefill, batch), kTolerance) << "lengths from " << first;
    ASSERT_LE(d.Step(StepKind::kDecode, ones), kTolerance);
    ASSERT_LE(d.Step(StepKind::kVerify, drafts), kTolerance);
    ASSERT_TRUE(d.Commit(accept).ok());
    ASSERT_LE(d.Step(StepKind::kDecode, ones), kTolerance);
    ASSERT_TRUE(engine->Close("", ids).ok());
  }
}

TEST_P(EngineSuite, BatchMixingEveryPhaseMatchesOracle) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2, 3, 4, 5});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{2, 3}, {3, 7}, {4, 20}, {5, 2}}), kTolerance);
  // 1: fresh; 2: stateless with rows; 3: stateful; 4: long prefill with tail; 5: will verify.
  ASSERT_LE(d.Step(StepKind::kVerify, {{5, 4}}), kTolerance);
  ASSERT_TRUE(d.Commit({{5, 2}}).ok());
  for (int i = 0; i < 12; ++i) {
    ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}}), kTolerance);
    ASSERT_LE(d.Step(StepKind::kVerify, {{1, 1 + i % 4}, {2, 2}, {3, 4}, {4, 3}, {5, 1}}),
              kTolerance);
    ASSERT_TRUE(d.Commit({{1, i % 2}, {2, 2}, {3, i % 5}, {4, 1}, {5, 0}}).ok());
    ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 1}, {2, 5}, {3, 2}, {4, 9}, {5, 3}}), kTolerance);
  }
  ASSERT_TRUE(engine->Flush("", {1, 2, 3, 4, 5}).ok());
  ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}}), kTolerance);
}

TEST_P(EngineSuite, FlushFoldsEverythingAndDecodingContinues) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 3}, {2, 11}}), kTolerance);
  ASSERT_TRUE(engine->Flush("", {1, 2}).ok());
  for (uint64_t id : {1, 2}) {
    auto info = engine->Describe("", id);
    ASSERT_TRUE(info.ok());
    EXPECT_TRUE(info->has_state);
    EXPECT_EQ(info->buffer_pages, 0) << "a flushed sequence holds no pages";
  }
  ASSERT_TRUE(engine->Flush("", {1}).ok());  // flushing an empty buffer is harmless
  for (int i = 0; i < 7; ++i) ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {2, 1}}), kTolerance);
}

TEST_P(EngineSuite, RetriedCallIsAnsweredOnceWithTheSameOutputs) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 5}, {2, 3}}), kTolerance);
  for (StepKind kind : {StepKind::kDecode, StepKind::kVerify, StepKind::kPrefill}) {
    const int32_t t = kind == StepKind::kDecode ? 1 : 3;
    for (int32_t l = 0; l < d.config().num_layers; ++l) {
      Activations x = d.MakeActivations(2 * t, DType::kBFloat16);
      LayerCall call = d.MakeCall(l, {{1, t}, {2, t}}, x);
      auto run = [&]() {
        return kind == StepKind::kPrefill ? engine->Prefill(call)
               : kind == StepKind::kDecode ? engine->DecodeStep(call)
                                           : engine->VerifyDrafts(call);
      };
      auto first = run();
      ASSERT_TRUE(first.ok()) << first.status();
      EXPECT_FALSE(first->replayed);
      auto again = run();
      ASSERT_TRUE(again.ok()) << again.status();
      EXPECT_TRUE(again->replayed);
      EXPECT_EQ(first->out.bytes, again->out.bytes);
      EXPECT_EQ(first->positions, again->positions);
      ASSERT_LE(d.Check(kind, l, {{1, t}, {2, t}}, x, *first), kTolerance);
    }
    if (kind == StepKind::kVerify) {
      ASSERT_TRUE(d.Commit({{1, 2}, {2, 3}}).ok());
      // A retried commit is accepted once and changes nothing.
      auto pos1 = d.Oracle(1).position(0);
      ASSERT_TRUE(engine->CommitDrafts("", {{1, pos1 - 2, 2}, {2, d.Oracle(2).position(0) - 3, 3}})
                      .ok());
    }
  }
  for (int i = 0; i < 6; ++i) ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {2, 1}}), kTolerance);
}

TEST_P(EngineSuite, ErrorsHaveTheRightCodeAndChangeNothing) {
  EngineOptions o = SmallOptions();
  KVB_ENGINE_OR_SKIP(engine, o);
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 5}, {2, 9}}), kTolerance);
  const ModelConfig& m = d.config();
  auto expect = [&](absl::StatusCode code, absl::Status s, const std::string& needle) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s << " should mention " << needle;
  };
  Activations x = d.MakeActivations(2, DType::kFloat32);
  // Unknown sequence, in a batch with a good one: nothing applied to the good one.
  {
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c.sequences[1].id = 99;
    expect(absl::StatusCode::kNotFound, engine->DecodeStep(c).status(), "99");
  }
  // Wrong shape.
  {
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c.qkv.shape = {2, m.channels() - 1};
    expect(absl::StatusCode::kInvalidArgument, engine->DecodeStep(c).status(), "qkv.shape");
  }
  // Wrong dtype (a differs from qkv), and a byte count that does not match.
  {
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c.a.dtype = DType::kBFloat16;
    expect(absl::StatusCode::kInvalidArgument, engine->DecodeStep(c).status(), "a.dtype");
    LayerCall c2 = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c2.b.size_bytes -= 4;
    expect(absl::StatusCode::kInvalidArgument, engine->DecodeStep(c2).status(), "b.data");
  }
  // Bad layer.
  {
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c.layer = m.num_layers;
    expect(absl::StatusCode::kInvalidArgument, engine->DecodeStep(c).status(), "layer");
  }
  // Position mismatch names both positions.
  {
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c.sequences[1].position += 3;
    absl::Status s = engine->DecodeStep(c).status();
    expect(absl::StatusCode::kFailedPrecondition, s, "position is 12");
    expect(absl::StatusCode::kFailedPrecondition, s, "at position 9");
  }
  // Decode with more than one token; verify with too many drafts.
  {
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, x);
    c.sequences[0].num_tokens = 2;
    c.sequences[1].num_tokens = 0;
    expect(absl::StatusCode::kInvalidArgument, engine->DecodeStep(c).status(), "num_tokens");
    Activations big = d.MakeActivations(o.max_drafts + 1, DType::kFloat32);
    LayerCall v = d.MakeCall(0, {{1, o.max_drafts + 1}}, big);
    expect(absl::StatusCode::kInvalidArgument, engine->VerifyDrafts(v).status(), "max_drafts");
  }
  // NaN activations are rejected before they reach a state.
  {
    Activations bad = d.MakeActivations(2, DType::kFloat32);
    float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(bad.qkv_bytes.data() + 4 * 17, &nan, 4);
    LayerCall c = d.MakeCall(0, {{1, 1}, {2, 1}}, bad);
    expect(absl::StatusCode::kInvalidArgument, engine->DecodeStep(c).status(), "non-finite");
  }
  // Over-commit, and commit without drafts on every layer.
  ASSERT_LE(d.Step(StepKind::kVerify, {{1, 3}}), kTolerance);
  expect(absl::StatusCode::kOutOfRange,
         engine->CommitDrafts("", {{1, d.Oracle(1).position(0), 4}}), "only 3");
  expect(absl::StatusCode::kFailedPrecondition,
         engine->CommitDrafts("", {{1, d.Oracle(1).position(0), 1}, {2, d.Oracle(2).position(0), 0}}),
         "no drafts pending");
  // Decode while drafts are pending.
  {
    Activations one = d.MakeActivations(1, DType::kFloat32);
    LayerCall c = d.MakeCall(0, {{1, 1}}, one);
    expect(absl::StatusCode::kFailedPrecondition, engine->DecodeStep(c).status(), "uncommitted");
  }
  ASSERT_TRUE(d.Commit({{1, 3}}).ok());
  // Unknown ids in lifecycle calls; duplicates.
  expect(absl::StatusCode::kNotFound, engine->Close("", {2, 77}), "77");
  expect(absl::StatusCode::kAlreadyExists, engine->Open("", {5, 1}), "1");
  expect(absl::StatusCode::kInvalidArgument, engine->Open("", {8, 8}), "repeats");
  expect(absl::StatusCode::kNotFound, engine->Flush("", {1, 78}), "78");
  // Nothing above changed anything: both sequences continue exactly.
  EXPECT_EQ(engine->Info().open_sequences, 2);
  for (int i = 0; i < 9; ++i) ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {2, 1}}), kTolerance);
}

TEST_P(EngineSuite, FullPoolsAreResourceExhaustedAndChangeNothing) {
  EngineOptions o = SmallOptions();
  o.max_sequences = 4;
  o.state_slots = 1;
  o.buffer_pages = 9;
  KVB_ENGINE_OR_SKIP(engine, o);
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2, 3, 9});
  absl::Status s = engine->Open("", {4});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("max_sequences=4"), std::string::npos) << s;
  ASSERT_TRUE(engine->Close("", {9}).ok());
  // Sequence 1 takes the only state slot.
  ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 10}}), kTolerance);
  // A batch where sequence 3 would need a second state slot fails whole: 2 is not advanced.
  {
    Activations x = d.MakeActivations(3 + 10, DType::kFloat32);
    LayerCall c = d.MakeCall(0, {{2, 3}, {3, 10}}, x);
    absl::Status st = engine->Prefill(c).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
    EXPECT_NE(st.message().find("state pool"), std::string::npos) << st;
  }
  // Page pool: 9 pages of 2 rows; sequence 1 holds 1, stateless sequences 2 and 3 at 6 rows take
  // 3 each; after 3 closes and 5 takes its 3, a 6-row sequence 6 finds only 2 free.
  ASSERT_LE(d.Step(StepKind::kPrefill, {{2, 6}, {3, 6}}), kTolerance);
  ASSERT_TRUE(engine->Close("", {3}).ok());
  d.Open({5});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{5, 6}}), kTolerance);
  d.Open({6});
  {
    Activations x = d.MakeActivations(6, DType::kFloat32);
    LayerCall c = d.MakeCall(0, {{6, 6}}, x);
    absl::Status st = engine->Prefill(c).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
    EXPECT_NE(st.message().find("buffer page pool"), std::string::npos) << st;
  }
  // Everyone continues exactly after the failures.
  ASSERT_LE(d.Step(StepKind::kDecode, {{1, 1}, {6, 1}}), kTolerance);
  ASSERT_LE(d.Step(StepKind::kVerify, {{1, 1}}), kTolerance);
  ASSERT_TRUE(d.Commit({{1, 0}}).ok());
  ASSERT_TRUE(engine->Close("", {1, 2, 5, 6}).ok());
  EngineInfo info = engine->Info();
  EXPECT_EQ(info.free_state_slots, o.state_slots) << "no slot leaked";
  EXPECT_EQ(info.free_buffer_pages, o.buffer_pages) << "no page leaked";
  EXPECT_EQ(info.free_conv_slots, o.max_sequences);
}

inline absl::Time fake_now = absl::UnixEpoch();
inline absl::Time FakeNow() { return fake_now; }

TEST_P(EngineSuite, IdleSequencesAreReclaimedAfterTtl) {
  EngineOptions o = SmallOptions();
  o.idle_ttl = absl::Seconds(30);
  KVB_ENGINE_OR_SKIP(engine, o);
  engine->SetClockForTesting(&FakeNow);
  fake_now = absl::UnixEpoch() + absl::Hours(1);
  EngineDriver d(engine.get(), Seed());
  d.Open({1, 2});
  ASSERT_LE(d.Step(StepKind::kPrefill, {{1, 10}, {2, 10}}), kTolerance);
  fake_now += absl::Seconds(20);
  ASSERT_LE(d.Step(StepKind::kDecode, {{2, 1}}), kTolerance);
  EXPECT_EQ(engine->ReclaimIdle(fake_now + absl::Seconds(15)), 1);  // 1 idle 35 s, 2 idle 15 s
  EXPECT_EQ(engine->Describe("", 1).status().code(), absl::StatusCode::kNotFound);
  ASSERT_LE(d.Step(StepKind::kDecode, {{2, 1}}), kTolerance);
  EXPECT_EQ(engine->Info().free_state_slots, o.state_slots - 1);
}

TEST_P(EngineSuite, TenantsCannotSeeEachOthersSequences) {
  KVB_ENGINE_OR_SKIP(engine, SmallOptions());
  ASSERT_TRUE(engine->Open("alice", {1}).ok());
  ASSERT_TRUE(engine->Open("bob", {1}).ok());  // same id, another namespace
  EXPECT_EQ(engine->Close("carol", {1}).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(engine->Close("alice", {1}).ok());
  EXPECT_TRUE(engine->Describe("bob", 1).ok());
}

TEST_P(EngineSuite, TenantQuotaLimitsOpenSequences) {
  EngineOptions o = SmallOptions();
  o.max_sequences_per_tenant = 2;
  KVB_ENGINE_OR_SKIP(engine, o);
  ASSERT_TRUE(engine->Open("alice", {1, 2}).ok());
  absl::Status s = engine->Open("alice", {3});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("max_sequences_per_tenant=2"), std::string::npos) << s;
  EXPECT_TRUE(engine->Open("bob", {1, 2}).ok());  // quotas are per tenant
  ASSERT_TRUE(engine->Close("alice", {1}).ok());
  EXPECT_TRUE(engine->Open("alice", {3}).ok());
}

}  // namespace kvbuffer::testing
