#include "service/engine/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/reference/gdn_oracle.h"
#include "kernels/reference/layer_params.h"
#include "kernels/reference/model_config.h"
#include "kernels/reference/reference_test_util.h"

namespace kvbuffer {
namespace {

using testing::Preset;

constexpr double kTol = 1e-5;

// Settings of one test backend and the engine-like policy the harness applies.
struct HarnessOptions {
  const char* preset = "tiny";
  int32_t page_tokens = 16;
  DType buffer_dtype = DType::kFloat32;
  DType conv_dtype = DType::kFloat32;
  DType in_dtype = DType::kFloat32;
  DType out_dtype = DType::kFloat32;
  int32_t flush_interval = 16;   // C
  int32_t stateless_limit = 32;  // rows a stateless sequence may hold
  int32_t max_drafts = 16;
  int32_t num_seqs = 2;
  int32_t max_rows = 96;  // buffer rows each sequence can hold (pages are reserved up front)
  uint32_t seed = 1;
};

// Drives a CpuBackend the way the engine does (policy of DESIGN §2/§3: fold when the buffer
// would overflow, chunked prefill past the limit, drafts tentative until committed) and checks
// every output against an OracleSequence per sequence.
class Harness {
 public:
  struct Seq {
    int32_t conv_slot = 0;
    int32_t state_slot = 0;
    std::vector<int32_t> pages;
    std::vector<char> has_state;                                  // per layer
    std::vector<int32_t> rows;                                    // committed buffer rows per layer
    std::vector<int32_t> pending;                                 // drafts per layer
    std::vector<std::vector<float>> draft_qkv, draft_a, draft_b;  // per layer, as received
    std::unique_ptr<OracleSequence> oracle;
  };

  explicit Harness(const HarnessOptions& o)
      : o_(o), c_(Preset(o.preset)), params_(MakeAllLayerParams(c_)), rng_(o.seed) {
    sizes_.page_tokens = o.page_tokens;
    sizes_.max_drafts = o.max_drafts;
    sizes_.buffer_dtype = o.buffer_dtype;
    sizes_.conv_dtype = o.conv_dtype;
    pages_per_seq_ = (o.max_rows + o.page_tokens - 1) / o.page_tokens;
    sizes_.state_slots = o.num_seqs + 1;
    sizes_.conv_slots = o.num_seqs + 1;
    sizes_.buffer_pages = o.num_seqs * pages_per_seq_ + 1;
    EXPECT_TRUE(backend_.Allocate(c_, params_, sizes_).ok());
    std::vector<int32_t> conv_slots;
    for (int32_t s = 0; s < o.num_seqs; ++s) {
      Seq q;
      q.conv_slot = o.num_seqs - s;  // slot 0 stays unused
      q.state_slot = o.num_seqs - s;
      for (int32_t p = pages_per_seq_ - 1; p >= 0; --p) q.pages.push_back(p * o.num_seqs + s + 1);
      q.has_state.assign(c_.num_layers, 0);
      q.rows.assign(c_.num_layers, 0);
      q.pending.assign(c_.num_layers, 0);
      q.draft_qkv.resize(c_.num_layers);
      q.draft_a.resize(c_.num_layers);
      q.draft_b.resize(c_.num_layers);
      q.oracle = std::make_unique<OracleSequence>(c_, &params_);
      conv_slots.push_back(q.conv_slot);
      seqs_.push_back(std::move(q));
    }
    // Conv windows of new sequences are reset as the engine does.
    EXPECT_TRUE(backend_.ResetConv(conv_slots).ok());
  }

  const ModelConfig& config() const { return c_; }
  CpuBackend& backend() { return backend_; }
  Seq& seq(int32_t s) { return seqs_[s]; }
  double worst() const { return worst_; }

  // Runs one per-layer step of `kind` for sequences `ids` with `tokens` each; fold_override[i]
  // >= 0 forces the chunked path with that fold point. Returns the worst relative error.
  double Step(StepKind kind, int32_t layer, const std::vector<int32_t>& ids,
              const std::vector<int32_t>& tokens, std::vector<int32_t> fold_override = {}) {
    const int32_t ch = c_.channels(), HV = c_.num_v_heads;
    fold_override.resize(ids.size(), -1);
    int32_t total = 0;
    for (int32_t t : tokens) total += t;
    // Random activations, rounded to in_dtype; the oracle sees the rounded values.
    std::normal_distribution<float> n01(0.0f, 1.0f);
    std::vector<float> qkv(static_cast<size_t>(total) * ch), a(total * HV), b(total * HV);
    for (auto* v : {&qkv, &a, &b}) {
      for (float& x : *v) x = Round(n01(rng_), o_.in_dtype);
    }
    std::vector<uint8_t> qkv_in = Encode(qkv, o_.in_dtype), a_in = Encode(a, o_.in_dtype),
                         b_in = Encode(b, o_.in_dtype);
    std::vector<uint8_t> out(static_cast<size_t>(total) * c_.out_elems() * DTypeSize(o_.out_dtype));
    std::vector<StepItem> items(ids.size());
    std::vector<int32_t> page_table;
    std::vector<int32_t> rows_after(ids.size());
    int32_t offset = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& q = seqs_[ids[i]];
      StepItem& it = items[i];
      const int32_t t = tokens[i];
      const int32_t rows = q.rows[layer];
      const bool has = q.has_state[layer];
      const int32_t limit = has ? o_.flush_interval : o_.stateless_limit;
      it.token_offset = offset;
      it.num_tokens = t;
      it.buffer_rows = rows;
      it.conv_slot = q.conv_slot;
      if (kind == StepKind::kPrefill && (rows + t > limit || fold_override[i] >= 0)) {
        it.chunked = true;
        it.fold_first = rows > 0 || !has;
        it.fold_tokens = fold_override[i] >= 0 ? fold_override[i] : t - t % o_.flush_interval;
        rows_after[i] = t - it.fold_tokens;
      } else if (rows + t > limit) {
        it.fold_first = true;
        rows_after[i] = t;
      } else {
        rows_after[i] = rows + t;
      }
      it.state_is_new = (it.fold_first || it.chunked) && !has;
      it.state_slot = (has || it.fold_first || it.chunked) ? q.state_slot : -1;
      it.page_offset = static_cast<int32_t>(page_table.size());
      it.num_pages = static_cast<int32_t>(q.pages.size());
      page_table.insert(page_table.end(), q.pages.begin(), q.pages.end());
      offset += t;
    }
    LayerStep step;
    step.layer = layer;
    step.kind = kind;
    step.items = items;
    step.page_table = page_table;
    step.in_dtype = o_.in_dtype;
    step.qkv = qkv_in.data();
    step.a = a_in.data();
    step.b = b_in.data();
    step.total_tokens = total;
    step.out_dtype = o_.out_dtype;
    step.out = out.data();
    const absl::Status st = backend_.RunLayerStep(step);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return 1e300;

    double worst = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& q = seqs_[ids[i]];
      const StepItem& it = items[i];
      const size_t t0 = it.token_offset;
      const float* qa = qkv.data() + t0 * ch;
      const float* aa = a.data() + t0 * HV;
      const float* ba = b.data() + t0 * HV;
      std::vector<double> want;
      if (kind == StepKind::kVerify) {
        OracleSequence copy = *q.oracle;
        want = copy.Append(layer, qa, aa, ba, it.num_tokens);
        q.draft_qkv[layer].assign(qa, qa + static_cast<size_t>(it.num_tokens) * ch);
        q.draft_a[layer].assign(aa, aa + static_cast<size_t>(it.num_tokens) * HV);
        q.draft_b[layer].assign(ba, ba + static_cast<size_t>(it.num_tokens) * HV);
        q.pending[layer] = it.num_tokens;
        q.rows[layer] = it.fold_first ? 0 : q.rows[layer];
      } else {
        want = q.oracle->Append(layer, qa, aa, ba, it.num_tokens);
        q.rows[layer] = rows_after[i];
      }
      if (it.fold_first || it.chunked) q.has_state[layer] = 1;
      std::vector<float> got(want.size());
      for (size_t j = 0; j < got.size(); ++j) {
        got[j] = LoadAsFloat(out.data(), o_.out_dtype, t0 * c_.out_elems() + j);
      }
      worst = std::max(worst, RelativeError(got.data(), want.data(), want.size()));
    }
    worst_ = std::max(worst_, worst);
    return worst;
  }

  // Runs `kind` on every layer (layer by layer, as a model does) and returns the worst error.
  double StepAllLayers(StepKind kind, const std::vector<int32_t>& ids,
                       const std::vector<int32_t>& tokens,
                       const std::vector<int32_t>& fold_override = {}) {
    double worst = 0;
    for (int32_t l = 0; l < c_.num_layers; ++l) {
      worst = std::max(worst, Step(kind, l, ids, tokens, fold_override));
    }
    return worst;
  }

  // Keeps the first `accepted` pending drafts of sequence `id` on every layer.
  void Commit(int32_t id, int32_t accepted) {
    Seq& q = seqs_[id];
    for (int32_t l = 0; l < c_.num_layers; ++l) {
      if (q.pending[l] == 0) continue;
      const ConvCommitItem item{q.conv_slot, accepted, q.pending[l]};
      const absl::Status st = backend_.CommitConv(l, {&item, 1});
      EXPECT_TRUE(st.ok()) << st;
      if (accepted > 0) {
        q.oracle->Append(l, q.draft_qkv[l].data(), q.draft_a[l].data(), q.draft_b[l].data(),
                         accepted);
      }
      q.rows[l] += accepted;
      q.pending[l] = 0;
    }
  }

  // Standalone flush of sequence `id` on every layer; afterwards its buffers are empty.
  void Flush(int32_t id) {
    Seq& q = seqs_[id];
    for (int32_t l = 0; l < c_.num_layers; ++l) {
      FoldItem f{q.state_slot, !q.has_state[l], q.rows[l], 0, static_cast<int32_t>(q.pages.size())};
      const absl::Status st = backend_.FoldBuffers(l, {&f, 1}, q.pages);
      EXPECT_TRUE(st.ok()) << st;
      q.has_state[l] = 1;
      q.rows[l] = 0;
    }
  }

  // Closes sequence `id` and opens a fresh one in the same slots and pages.
  void Reopen(int32_t id) {
    Seq& q = seqs_[id];
    EXPECT_TRUE(backend_.ResetConv({&q.conv_slot, 1}).ok());
    q.has_state.assign(c_.num_layers, 0);
    q.rows.assign(c_.num_layers, 0);
    q.pending.assign(c_.num_layers, 0);
    q.oracle = std::make_unique<OracleSequence>(c_, &params_);
  }

  // Relative error of the backend's state of sequence `id` on `layer` against the oracle's.
  double StateError(int32_t id, int32_t layer) {
    std::vector<float> S(c_.state_elems());
    EXPECT_TRUE(backend_.ReadState(seqs_[id].state_slot, layer, S.data()).ok());
    const auto& want = seqs_[id].oracle->state(layer);
    return RelativeError(S.data(), want.data(), want.size());
  }

 private:
  static float Round(float x, DType t) {
    uint8_t buf[4];
    StoreFromFloat(buf, t, 0, x);
    return LoadAsFloat(buf, t, 0);
  }
  static std::vector<uint8_t> Encode(const std::vector<float>& v, DType t) {
    std::vector<uint8_t> bytes(v.size() * DTypeSize(t));
    for (size_t i = 0; i < v.size(); ++i) StoreFromFloat(bytes.data(), t, i, v[i]);
    return bytes;
  }

  HarnessOptions o_;
  ModelConfig c_;
  std::vector<LayerParams> params_;
  std::mt19937 rng_;
  PoolSizes sizes_;
  int32_t pages_per_seq_ = 0;
  CpuBackend backend_;
  std::vector<Seq> seqs_;
  double worst_ = 0;
};

struct Layout {
  const char* preset;
  int32_t page_tokens;
};
constexpr Layout kLayouts[] = {{"tiny", 4}, {"tiny", 16}, {"small", 4}, {"small", 16}};

TEST(CpuBackendTest, DecodeAcrossSeveralFoldsMatchesOracle) {
  uint32_t seed = 601;
  for (const Layout& lay : kLayouts) {
    HarnessOptions o;
    o.preset = lay.preset;
    o.page_tokens = lay.page_tokens;
    o.flush_interval = 8;
    o.stateless_limit = 12;
    o.num_seqs = 3;
    o.max_rows = 16;
    o.seed = seed++;
    Harness h(o);
    for (int32_t t = 0; t < 45; ++t) {  // stateless up to 12, then a fold every 8 tokens
      ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0, 1, 2}, {1, 1, 1}), kTol) << t;
    }
    for (int32_t s = 0; s < 3; ++s) EXPECT_TRUE(h.seq(s).has_state[0]);
    std::printf("[cpu decode] %s page_tokens=%d worst %.3g\n", lay.preset, lay.page_tokens,
                h.worst());
  }
}

TEST(CpuBackendTest, VerifyAndCommitConvForEveryAcceptCount) {
  uint32_t seed = 611;
  for (const Layout& lay : {kLayouts[0], kLayouts[3]}) {
    HarnessOptions o;
    o.preset = lay.preset;
    o.page_tokens = lay.page_tokens;
    o.flush_interval = 16;
    o.stateless_limit = 20;
    o.max_rows = 32;
    o.seed = seed++;
    Harness h(o);
    std::vector<std::pair<int32_t, int32_t>> rounds;  // (drafts, accepted)
    for (int32_t m = 1; m <= 6; ++m) {
      for (int32_t acc = 0; acc <= m; ++acc) rounds.push_back({m, acc});
    }
    for (int32_t acc : {0, 1, 9, 15, 16}) rounds.push_back({16, acc});
    for (auto [m, acc] : rounds) {
      // Sequence 1 verifies a different draft count in the same batch.
      const int32_t m1 = m % 3 + 1, acc1 = std::min(acc, m1);
      ASSERT_LE(h.StepAllLayers(StepKind::kVerify, {0, 1}, {m, m1}), kTol)
          << "m=" << m << " accepted=" << acc;
      h.Commit(0, acc);
      h.Commit(1, acc1);
      // The next committed token sees the rolled-back buffer and conv window.
      ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0, 1}, {1, 1}), kTol)
          << "after m=" << m << " accepted=" << acc;
    }
    std::printf("[cpu verify] %s page_tokens=%d worst %.3g\n", lay.preset, lay.page_tokens,
                h.worst());
  }
}

TEST(CpuBackendTest, ChunkedPrefillWithFoldTokensAndTailRows) {
  uint32_t seed = 621;
  for (const Layout& lay : kLayouts) {
    HarnessOptions o;
    o.preset = lay.preset;
    o.page_tokens = lay.page_tokens;
    o.flush_interval = 16;
    o.stateless_limit = 32;
    o.num_seqs = 3;
    o.max_rows = 64;
    o.seed = seed++;
    Harness h(o);
    // Varlen batch: a short stateless prefill, a chunked one with a tail, one at a chunk edge.
    ASSERT_LE(h.StepAllLayers(StepKind::kPrefill, {0, 1, 2}, {5, 130, 64}), kTol);
    EXPECT_EQ(h.seq(0).rows[0], 5);
    EXPECT_EQ(h.seq(1).rows[0], 130 % 16);
    EXPECT_EQ(h.seq(2).rows[0], 0);
    // Decode across flushes, then a second prefill onto existing buffers and states.
    for (int32_t t = 0; t < 20; ++t) {
      ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0, 1, 2}, {1, 1, 1}), kTol) << t;
    }
    ASSERT_LE(h.StepAllLayers(StepKind::kPrefill, {2, 0, 1}, {65, 40, 3}), kTol);
    // Fold points anywhere (not multiples of C or of the chunk), with long tails.
    ASSERT_LE(h.StepAllLayers(StepKind::kPrefill, {0, 1, 2}, {70, 1, 100}, {27, 0, 63}), kTol);
    EXPECT_EQ(h.seq(0).rows[0], 43);
    EXPECT_EQ(h.seq(1).rows[0], 1);
    EXPECT_EQ(h.seq(2).rows[0], 37);
    for (int32_t t = 0; t < 20; ++t) {
      ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0, 1, 2}, {1, 1, 1}), kTol) << t;
    }
    std::printf("[cpu prefill] %s page_tokens=%d worst %.3g\n", lay.preset, lay.page_tokens,
                h.worst());
  }
}

TEST(CpuBackendTest, StatelessThenFirstFold) {
  for (const Layout& lay : {kLayouts[1], kLayouts[2]}) {
    HarnessOptions o;
    o.preset = lay.preset;
    o.page_tokens = lay.page_tokens;
    o.flush_interval = 16;
    o.stateless_limit = 64;
    o.num_seqs = 1;
    o.max_rows = 64;
    o.seed = 631 + lay.page_tokens;
    Harness h(o);
    for (int32_t t = 0; t < 64; ++t) {
      ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0}, {1}), kTol) << t;
      ASSERT_FALSE(h.seq(0).has_state[0]);
    }
    // Token 65 folds the 64 stateless rows into a fresh state slot first.
    for (int32_t l = 0; l < h.config().num_layers; ++l) {
      OracleSequence before = *h.seq(0).oracle;
      ASSERT_LE(h.Step(StepKind::kDecode, l, {0}, {1}), kTol);
      ASSERT_TRUE(h.seq(0).has_state[l]);
      std::vector<float> S(h.config().state_elems());
      ASSERT_TRUE(h.backend().ReadState(h.seq(0).state_slot, l, S.data()).ok());
      EXPECT_LE(RelativeError(S.data(), before.state(l).data(), S.size()), kTol) << l;
    }
    for (int32_t t = 0; t < 20; ++t) {
      ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0}, {1}), kTol) << t;
    }
    // A standalone flush leaves the state equal to the recurrence.
    h.Flush(0);
    for (int32_t l = 0; l < h.config().num_layers; ++l) EXPECT_LE(h.StateError(0, l), kTol);
    ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0}, {1}), kTol);
    std::printf("[cpu stateless] %s page_tokens=%d worst %.3g\n", lay.preset, lay.page_tokens,
                h.worst());
  }
}

TEST(CpuBackendTest, Bf16BufferErrorIsMeasuredAndBounded) {
  HarnessOptions o;
  o.preset = "small";
  o.page_tokens = 16;
  o.buffer_dtype = DType::kBFloat16;
  o.flush_interval = 16;
  o.stateless_limit = 32;
  o.max_rows = 32;
  o.seed = 641;
  Harness h(o);
  double decode = 0, verify = 0;
  for (int32_t t = 0; t < 100; ++t) {
    decode = std::max(decode, h.StepAllLayers(StepKind::kDecode, {0, 1}, {1, 1}));
  }
  for (int32_t r = 0; r < 10; ++r) {
    verify = std::max(verify, h.StepAllLayers(StepKind::kVerify, {0, 1}, {4, 8}));
    h.Commit(0, r % 5);
    h.Commit(1, 8 - r % 5);
  }
  std::printf("[cpu bf16 buffer] small: relative error vs fp64 oracle: decode %.3g, verify %.3g\n",
              decode, verify);
  EXPECT_LT(decode, 2e-2);
  EXPECT_LT(verify, 2e-2);
  EXPECT_GT(decode, 0.0);
}

TEST(CpuBackendTest, ActivationAndConvDtypes) {
  struct Case {
    DType in, out, conv;
    double tol;
  };
  // FP16/BF16 inputs are exact in fp32 (the oracle sees the same values); BF16 conv rows are
  // exact when the inputs are BF16; 16-bit outputs cost their rounding.
  for (const Case& k : {Case{DType::kFloat16, DType::kFloat32, DType::kFloat32, kTol},
                        Case{DType::kBFloat16, DType::kFloat32, DType::kBFloat16, kTol},
                        Case{DType::kFloat32, DType::kFloat16, DType::kFloat32, 1e-3},
                        Case{DType::kFloat32, DType::kBFloat16, DType::kFloat32, 8e-3}}) {
    HarnessOptions o;
    o.in_dtype = k.in;
    o.out_dtype = k.out;
    o.conv_dtype = k.conv;
    o.page_tokens = 4;
    o.seed = 651 + static_cast<uint32_t>(k.in) * 3 + static_cast<uint32_t>(k.out);
    Harness h(o);
    double worst = h.StepAllLayers(StepKind::kPrefill, {0, 1}, {40, 3});
    for (int32_t t = 0; t < 20; ++t) {
      worst = std::max(worst, h.StepAllLayers(StepKind::kDecode, {0, 1}, {1, 1}));
    }
    worst = std::max(worst, h.StepAllLayers(StepKind::kVerify, {0, 1}, {3, 5}));
    h.Commit(0, 2);
    h.Commit(1, 5);
    worst = std::max(worst, h.StepAllLayers(StepKind::kDecode, {0, 1}, {1, 1}));
    EXPECT_LE(worst, k.tol) << DTypeName(k.in) << " -> " << DTypeName(k.out) << " conv "
                            << DTypeName(k.conv);
    std::printf("[cpu dtypes] in %s out %s conv %s worst %.3g\n", DTypeName(k.in), DTypeName(k.out),
                DTypeName(k.conv), worst);
  }
}

TEST(CpuBackendTest, ResetConvStartsANewSequenceInAReusedSlot) {
  HarnessOptions o;
  o.num_seqs = 2;
  o.flush_interval = 4;
  o.stateless_limit = 6;
  o.max_rows = 16;
  o.seed = 661;
  Harness h(o);
  for (int32_t t = 0; t < 9; ++t) {
    ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0, 1}, {1, 1}), kTol);
  }
  // Sequence 0 closes; a new one takes its slots (conv reset, state slot reused as new).
  h.Reopen(0);
  for (int32_t t = 0; t < 9; ++t) {
    ASSERT_LE(h.StepAllLayers(StepKind::kDecode, {0, 1}, {1, 1}), kTol) << t;
  }
  ASSERT_LE(h.StepAllLayers(StepKind::kPrefill, {1, 0}, {20, 7}), kTol);
}

TEST(CpuBackendTest, PoolElementBytesAndMemory) {
  const ModelConfig c = Preset("small");
  PoolSizes s;
  s.state_slots = 3;
  s.buffer_pages = 5;
  s.page_tokens = 8;
  s.conv_slots = 7;
  s.max_drafts = 4;
  s.buffer_dtype = DType::kBFloat16;
  s.conv_dtype = DType::kFloat32;
  const PoolElementBytes b = ComputePoolElementBytes(c, s);
  const int64_t L = 4, H = 4, HV = 8, K = 32, V = 32, W = 4, ch = 2 * H * K + HV * V;
  EXPECT_EQ(b.state_slot, L * HV * K * V * 4);
  EXPECT_EQ(b.buffer_row, (H * K + HV * V) * 2 + HV * 4);
  EXPECT_EQ(b.buffer_page, L * 8 * b.buffer_row);
  EXPECT_EQ(b.conv_slot, L * (W - 1 + 4) * ch * 4);
  CpuBackend backend;
  EXPECT_EQ(backend.Name(), "cpu");
  EXPECT_EQ(backend.Memory().pool_bytes, 0);
  ASSERT_TRUE(backend.Allocate(c, MakeAllLayerParams(c), s).ok());
  EXPECT_EQ(backend.Memory().pool_bytes, 3 * b.state_slot + 5 * b.buffer_page + 7 * b.conv_slot);
  EXPECT_EQ(backend.Memory().device_total_bytes, 0);
  EXPECT_EQ(MakeCpuBackend()->Name(), "cpu");
}

TEST(CpuBackendTest, BadArgumentsAreRejectedWithoutSideEffects) {
  const ModelConfig c = Preset("tiny");
  const auto params = MakeAllLayerParams(c);
  CpuBackend backend;
  float S[4096];
  EXPECT_EQ(backend.ReadState(0, 0, S).code(), absl::StatusCode::kFailedPrecondition);
  PoolSizes s;
  s.state_slots = 2;
  s.buffer_pages = 4;
  s.page_tokens = 4;
  s.conv_slots = 2;
  s.max_drafts = 4;
  EXPECT_EQ(backend.Allocate(c, {}, s).code(), absl::StatusCode::kInvalidArgument);
  PoolSizes neg = s;
  neg.page_tokens = 0;
  EXPECT_EQ(backend.Allocate(c, params, neg).code(), absl::StatusCode::kInvalidArgument);
  PoolSizes huge = s;
  huge.state_slots = 1 << 30;
  EXPECT_EQ(backend
                .Allocate(Preset("qwen3-next-80b-a3b"),
                          MakeAllLayerParams(Preset("qwen3-next-80b-a3b")), huge)
                .code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(backend.Allocate(c, params, s).ok());

  std::mt19937 rng(671);
  auto act = testing::RandomActivations(c, 8, rng);
  std::vector<float> out(8 * c.out_elems());
  const std::vector<int32_t> table = {0, 1, 2, 3};
  auto run = [&](StepItem it, StepKind kind = StepKind::kDecode, int32_t layer = 0,
                 int32_t total = 8) {
    LayerStep step;
    step.layer = layer;
    step.kind = kind;
    step.items = {&it, 1};
    step.page_table = table;
    step.qkv = act.qkv.data();
    step.a = act.a.data();
    step.b = act.b.data();
    step.total_tokens = total;
    step.out = out.data();
    return backend.RunLayerStep(step).code();
  };
  StepItem ok;
  ok.num_tokens = 1;
  ok.num_pages = 1;
  EXPECT_EQ(run(ok), absl::StatusCode::kOk);
  const auto bad = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(run(ok, StepKind::kDecode, 2), bad);     // layer
  EXPECT_EQ(run(ok, StepKind::kDecode, 0, 0), bad);  // tokens beyond total
  StepItem it = ok;
  it.state_slot = 2;
  EXPECT_EQ(run(it), bad);
  it = ok;
  it.conv_slot = -1;
  EXPECT_EQ(run(it), bad);
  it = ok;
  it.num_tokens = 0;
  EXPECT_EQ(run(it), bad);
  it = ok;
  it.buffer_rows = 4;  // 5 rows after the call do not fit one page of 4
  EXPECT_EQ(run(it), bad);
  it = ok;
  it.page_offset = 3;
  it.num_pages = 2;  // beyond the page table
  EXPECT_EQ(run(it), bad);
  it = ok;
  it.fold_first = true;  // no state slot
  EXPECT_EQ(run(it), bad);
  it = ok;
  it.chunked = true;
  it.state_slot = 0;
  EXPECT_EQ(run(it), bad);  // chunked outside prefill
  it.fold_tokens = 2;
  EXPECT_EQ(run(it, StepKind::kPrefill), bad);  // fold_tokens > num_tokens
  it = ok;
  it.num_tokens = 5;
  it.num_pages = 2;
  EXPECT_EQ(run(it, StepKind::kVerify), bad);  // more drafts than max_drafts
  const std::vector<int32_t> bad_table = {0, 9};
  LayerStep step;
  it = ok;
  it.num_pages = 2;
  step.items = {&it, 1};
  step.page_table = bad_table;
  step.qkv = act.qkv.data();
  step.a = act.a.data();
  step.b = act.b.data();
  step.total_tokens = 8;
  step.out = out.data();
  EXPECT_EQ(backend.RunLayerStep(step).code(), bad);  // page id out of range
  step.page_table = table;
  step.out = nullptr;
  EXPECT_EQ(backend.RunLayerStep(step).code(), bad);
  // A bad second item leaves the first one unapplied.
  StepItem two[2] = {ok, ok};
  two[1].conv_slot = 7;
  step.items = two;
  step.out = out.data();
  EXPECT_EQ(backend.RunLayerStep(step).code(), bad);

  const ConvCommitItem over{0, 3, 2};
  EXPECT_EQ(backend.CommitConv(0, {&over, 1}).code(), bad);
  const ConvCommitItem too_many{0, 1, 5};
  EXPECT_EQ(backend.CommitConv(0, {&too_many, 1}).code(), bad);
  const FoldItem fold{5, false, 0, 0, 0};
  EXPECT_EQ(backend.FoldBuffers(0, {&fold, 1}, table).code(), bad);
  const FoldItem rows{0, false, 9, 0, 2};
  EXPECT_EQ(backend.FoldBuffers(0, {&rows, 1}, table).code(), bad);
  const int32_t slot = 2;
  EXPECT_EQ(backend.ResetConv({&slot, 1}).code(), bad);
  EXPECT_EQ(backend.ReadState(0, 5, S).code(), bad);
  EXPECT_EQ(backend.ReadState(0, 0, nullptr).code(), bad);
  EXPECT_EQ(backend.ReadState(0, 0, S).code(), absl::StatusCode::kOk);

  // None of the rejected calls changed anything: a twin backend that only saw the accepted
  // call gives bit-identical outputs for the next step.
  CpuBackend twin;
  ASSERT_TRUE(twin.Allocate(c, params, s).ok());
  std::vector<float> out_twin(out.size());
  StepItem next = ok;
  next.buffer_rows = 1;
  for (CpuBackend* be : {&backend, &twin}) {
    LayerStep st;
    StepItem first = ok;
    st.items = {be == &twin ? &first : &next, 1};
    st.page_table = table;
    st.qkv = act.qkv.data();
    st.a = act.a.data();
    st.b = act.b.data();
    st.total_tokens = 8;
    st.out = be == &twin ? out_twin.data() : out.data();
    if (be == &twin) {
      ASSERT_TRUE(twin.RunLayerStep(st).ok());  // the one accepted call the first backend saw
      st.items = {&next, 1};
    }
    ASSERT_TRUE(be->RunLayerStep(st).ok());
  }
  EXPECT_EQ(out, out_twin);
}

}  // namespace
}  // namespace kvbuffer
