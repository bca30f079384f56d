// Test harness: two engines, a reference over one backend and one over N head shards, driven with
// the same calls on fresh random inputs and compared after every call: bit for bit (outputs with
// memcmp, then every layer of every state slot) or, for device backends, within a tolerance on
// the outputs. Shared by the CPU exactness tests and the multi-GPU tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "service/engine/engine.h"

namespace kvbuffer::parallel::testing {

using Seqs = std::vector<std::pair<uint64_t, int32_t>>;  // (id, tokens)

// The options of the comparisons: the "small" preset (H = 4), C = 4, stateless limit 6.
inline EngineOptions TwinOptions(DType pool_dtype) {
  EngineOptions o;
  ModelPreset("small", &o.model);
  o.flush_interval = 4;
  o.stateless_limit = 6;
  o.max_drafts = 4;
  o.max_sequences = 16;
  o.state_slots = 12;  // every state slot is compared after every call: keep them few
  o.buffer_pages = 1024;
  o.page_tokens = 2;
  o.buffer_dtype = pool_dtype;
  o.conv_dtype = pool_dtype;
  return o;
}

// Worst |a - b| / max(|a|, 1e-3 * scale) over two outputs of the same dtype.
inline double RelativeDifference(const Tensor& a, const Tensor& b) {
  const size_t n = a.bytes.size() / DTypeSize(a.dtype);
  double scale = 0;
  for (size_t i = 0; i < n; ++i) {
    scale = std::max(scale, std::abs(static_cast<double>(LoadAsFloat(a.bytes.data(), a.dtype, i))));
  }
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = LoadAsFloat(a.bytes.data(), a.dtype, i);
    const double y = LoadAsFloat(b.bytes.data(), b.dtype, i);
    worst = std::max(worst, std::abs(x - y) / std::max(std::abs(x), 1e-3 * scale + 1e-30));
  }
  return worst;
}

class TwinEngines {
 public:
  // Builds both engines; `tolerance` < 0 asks for bit-for-bit equality.
  void Init(const EngineOptions& o, std::unique_ptr<Backend> ref, std::unique_ptr<Backend> tp,
            double tolerance = -1) {
    options_ = o;
    tolerance_ = tolerance;
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    ASSERT_NE(ref, nullptr);
    ASSERT_NE(tp, nullptr);
    ref_backend_ = ref.get();
    tp_backend_ = tp.get();
    auto r = Engine::Create(o, std::move(ref));
    ASSERT_TRUE(r.ok()) << r.status();
    ref_ = *std::move(r);
    auto t = Engine::Create(o, std::move(tp));
    ASSERT_TRUE(t.ok()) << t.status();
    tp_ = *std::move(t);
  }

  Engine* ref() { return ref_.get(); }
  Engine* tp() { return tp_.get(); }
  Backend* ref_backend() { return ref_backend_; }
  Backend* tp_backend() { return tp_backend_; }
  const EngineOptions& options() const { return options_; }
  // Worst relative output difference seen (tolerance mode).
  double worst() const { return worst_; }

  std::string Where() const { return "seed " + std::to_string(seed_); }

  // Random activation bytes of `count` elements of `dtype` (N(0,1), never zeros).
  std::string Random(size_t count, DType dtype) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::string bytes(count * DTypeSize(dtype), '\0');
    for (size_t i = 0; i < count; ++i) {
      const float x = nd(rng_);
      if (dtype == DType::kFloat32) {
        std::memcpy(&bytes[4 * i], &x, 4);
      } else {
        const uint16_t h = dtype == DType::kBFloat16 ? FloatToBF16(x) : FloatToFP16(x);
        std::memcpy(&bytes[2 * i], &h, 2);
      }
    }
    return bytes;
  }

  int64_t Position(uint64_t id, int32_t layer) {
    auto info = ref_->Describe("", id);
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->positions[layer] : 0;
  }

  // Runs one per-layer call on both engines and requires identical results.
  void Layer(StepKind kind, int32_t layer, const Seqs& seqs, DType in, DType out) {
    const ModelConfig& m = options_.model;
    int64_t total = 0;
    LayerCall call;
    call.layer = layer;
    for (auto [id, t] : seqs) {
      call.sequences.push_back({id, Position(id, layer), t});
      total += t;
    }
    const std::string qkv = Random(total * m.channels(), in);
    const std::string a = Random(total * m.num_v_heads, in);
    const std::string b = Random(total * m.num_v_heads, in);
    call.qkv = {in, {total, m.channels()}, qkv.data(), qkv.size()};
    call.a = {in, {total, m.num_v_heads}, a.data(), a.size()};
    call.b = {in, {total, m.num_v_heads}, b.data(), b.size()};
    call.out_dtype = out;
    auto run = [&](Engine* e) {
      return kind == StepKind::kPrefill  ? e->Prefill(call)
             : kind == StepKind::kDecode ? e->DecodeStep(call)
                                         : e->VerifyDrafts(call);
    };
    absl::StatusOr<LayerResult> want = run(ref_.get());
    absl::StatusOr<LayerResult> got = run(tp_.get());
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(want->out.bytes.size(), got->out.bytes.size());
    if (tolerance_ < 0) {
      ASSERT_EQ(std::memcmp(want->out.bytes.data(), got->out.bytes.data(), want->out.bytes.size()),
                0)
          << "outputs differ on layer " << layer << ", " << Where();
    } else {
      const double err = RelativeDifference(want->out, got->out);
      worst_ = std::max(worst_, err);
      ASSERT_LE(err, tolerance_) << "outputs differ on layer " << layer << ", " << Where();
    }
    EXPECT_EQ(want->out.shape, got->out.shape);
    EXPECT_EQ(want->positions, got->positions);
    EXPECT_EQ(want->replayed, got->replayed);
    CompareStates();
  }

  // A step on every layer.
  void Step(StepKind kind, const Seqs& seqs, DType in = DType::kFloat32,
            DType out = DType::kFloat32) {
    for (int32_t l = 0; l < options_.model.num_layers; ++l) {
      ASSERT_NO_FATAL_FAILURE(Layer(kind, l, seqs, in, out)) << "layer " << l;
    }
  }

  void Commit(const Seqs& accepted) {
    std::vector<CommitItem> items;
    for (auto [id, a] : accepted) items.push_back({id, Position(id, 0), a});
    ASSERT_TRUE(ref_->CommitDrafts("", items).ok());
    ASSERT_TRUE(tp_->CommitDrafts("", items).ok());
    CompareStates();
  }

  void Flush(const std::vector<uint64_t>& ids) {
    ASSERT_TRUE(ref_->Flush("", ids).ok());
    ASSERT_TRUE(tp_->Flush("", ids).ok());
    CompareStates();
  }

  void Open(const std::vector<uint64_t>& ids) {
    ASSERT_TRUE(ref_->Open("", ids).ok());
    ASSERT_TRUE(tp_->Open("", ids).ok());
  }

  void Close(const std::vector<uint64_t>& ids) {
    ASSERT_TRUE(ref_->Close("", ids).ok());
    ASSERT_TRUE(tp_->Close("", ids).ok());
  }

  // Every layer of every state slot, bit for bit (slots are assigned identically by both engines;
  // unused slots hold the same stale or zero bytes on both).
  void CompareStates() {
    const EngineInfo ri = ref_->Info(), ti = tp_->Info();
    EXPECT_EQ(ri.flushes, ti.flushes);
    EXPECT_EQ(ri.free_state_slots, ti.free_state_slots);
    EXPECT_EQ(ri.free_buffer_pages, ti.free_buffer_pages);
    if (tolerance_ >= 0) return;  // device pools hold undefined bytes in unused slots
    const ModelConfig& m = options_.model;
    std::vector<float> want(m.state_elems()), got(m.state_elems());
    for (int32_t slot = 0; slot < options_.state_slots; ++slot) {
      for (int32_t l = 0; l < m.num_layers; ++l) {
        ASSERT_TRUE(ref_backend_->ReadState(slot, l, want.data()).ok());
        ASSERT_TRUE(tp_backend_->ReadState(slot, l, got.data()).ok());
        ASSERT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0)
            << "state slot " << slot << " layer " << l << " differs, " << Where();
      }
    }
  }

  // Scenario: PrefillShortStatelessAndChunkedThenDecode.
  void PrefillShortStatelessAndChunkedThenDecode() {
    Open({1, 2, 3, 4, 5});
    // 1 stateless (3 <= 6); 2 folds directly; 3 and 4 take the chunked path across 64-token chunks
    // with a tail; 5 is a single token.
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kPrefill, {{1, 3}, {2, 7}, {3, 70}, {4, 131}, {5, 1}}));
    for (int i = 0; i < 13; ++i) {  // several flush cycles of C = 4
      ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}}));
    }
    // A second chunked prefill on sequences that already have a state and buffered rows.
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kPrefill, {{2, 66}, {3, 5}, {5, 129}}));
    for (int i = 0; i < 5; ++i) {
      ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}}));
    }
    EXPECT_GT(tp_->Info().flushes, 0);
  }
  // Scenario: VerifyAndCommitEveryAcceptCount.
  void VerifyAndCommitEveryAcceptCount() {
    const int32_t m = options_.max_drafts;
    std::vector<uint64_t> ids;
    for (int32_t accept = 0; accept <= m; ++accept) ids.push_back(10 + accept);
    Open(ids);
    Seqs prefill, drafts, ones, accepted;
    for (int32_t accept = 0; accept <= m; ++accept) {
      prefill.push_back({10 + accept, 2 + accept});
      drafts.push_back({10 + accept, m});
      ones.push_back({10 + accept, 1});
      accepted.push_back({10 + accept, accept});
    }
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kPrefill, prefill));
    for (int round = 0; round < 5; ++round) {  // crosses the stateless limit and several folds
      ASSERT_NO_FATAL_FAILURE(Step(StepKind::kVerify, drafts));
      ASSERT_NO_FATAL_FAILURE(Commit(accepted));
      ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, ones));
    }
    // Ragged draft counts in one batch.
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kVerify, {{10, 1}, {11, 2}, {12, 3}, {13, 4}, {14, 2}}));
    ASSERT_NO_FATAL_FAILURE(Commit({{10, 1}, {11, 0}, {12, 3}, {13, 2}, {14, 2}}));
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, ones));
  }
  // Scenario: FlushStatelessAndReopenedSequences.
  void FlushStatelessAndReopenedSequences() {
    Open({1, 2, 3});
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kPrefill, {{1, 2}, {2, 5}, {3, 9}}));
    ASSERT_NO_FATAL_FAILURE(Flush({1, 2, 3}));  // allocates states for the stateless ones
    ASSERT_NO_FATAL_FAILURE(Flush({1}));        // empty buffer: nothing to fold
    for (int i = 0; i < 3; ++i) {
      ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}}));
    }
    // Reopened ids start over on recycled slots and pages (stale contents on both sides).
    Close({2, 3});
    Open({2, 3, 4});
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{2, 1}, {3, 1}, {4, 1}}));
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kPrefill, {{2, 4}, {3, 12}, {4, 1}}));
    for (int i = 0; i < 6; ++i) {
      ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}, {4, 1}}));
    }
    ASSERT_NO_FATAL_FAILURE(Flush({1, 2, 3, 4}));
    ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{1, 1}, {2, 1}, {3, 1}, {4, 1}}));
  }
  // Scenario: EveryActivationAndOutputDtype.
  void EveryActivationAndOutputDtype() {
    Open({1, 2});
    for (DType in : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
      for (DType out : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
        ASSERT_NO_FATAL_FAILURE(Step(StepKind::kPrefill, {{1, 3}, {2, 2}}, in, out));
        ASSERT_NO_FATAL_FAILURE(Step(StepKind::kDecode, {{1, 1}, {2, 1}}, in, out));
        ASSERT_NO_FATAL_FAILURE(Step(StepKind::kVerify, {{1, 2}, {2, 3}}, in, out));
        ASSERT_NO_FATAL_FAILURE(Commit({{1, 1}, {2, 3}}));
      }
    }
  }

 private:
  EngineOptions options_;
  double tolerance_ = -1;
  double worst_ = 0;
  uint32_t seed_ = 0;
  std::mt19937 rng_;
  Backend* ref_backend_ = nullptr;
  Backend* tp_backend_ = nullptr;
  std::unique_ptr<Engine> ref_, tp_;
};

}  // namespace kvbuffer::parallel::testing
