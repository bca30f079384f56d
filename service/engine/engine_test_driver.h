// Test driver: runs engine calls on every layer with fresh random activations and checks each
// output against a per-sequence fp64 oracle. Shared by the CPU and CUDA engine suites.
#pragma once

#include <cstdint>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/reference/gdn_oracle.h"
#include "service/engine/engine.h"

namespace kvbuffer::testing {

// Random activations of T tokens for one layer, held both as wire bytes and as the float values
// the service will see (after rounding to the wire dtype).
struct Activations {
  DType dtype = DType::kFloat32;
  int32_t tokens = 0;
  std::vector<float> qkv, a, b;     // rounded values, for the oracle
  std::string qkv_bytes, a_bytes, b_bytes;
};

class EngineDriver {
 public:
  EngineDriver(Engine* engine, uint32_t seed)
      : engine_(engine),
        config_(engine->options().model),
        params_(engine->options().params.empty() ? MakeAllLayerParams(config_)
                                                 : engine->options().params),
        rng_(seed) {}

  const ModelConfig& config() const { return config_; }
  std::mt19937& rng() { return rng_; }

  // Fresh N(0,1) activations (never zeros) for `tokens` tokens in `dtype`.
  Activations MakeActivations(int32_t tokens, DType dtype) {
    Activations x;
    x.dtype = dtype;
    x.tokens = tokens;
    std::normal_distribution<float> n(0.0f, 1.0f);
    auto fill = [&](std::vector<float>& v, std::string& bytes, size_t count) {
      v.resize(count);
      bytes.resize(count * DTypeSize(dtype));
      for (size_t i = 0; i < count; ++i) {
        StoreFromFloat(bytes.data(), dtype, i, n(rng_));
        v[i] = LoadAsFloat(bytes.data(), dtype, i);
      }
    };
    fill(x.qkv, x.qkv_bytes, static_cast<size_t>(tokens) * config_.channels());
    fill(x.a, x.a_bytes, static_cast<size_t>(tokens) * config_.num_v_heads);
    fill(x.b, x.b_bytes, static_cast<size_t>(tokens) * config_.num_v_heads);
    return x;
  }

  // Builds a LayerCall over `seqs` (id, tokens) with the engine's current positions.
  LayerCall MakeCall(int32_t layer, const std::vector<std::pair<uint64_t, int32_t>>& seqs,
                     const Activations& x) {
    LayerCall call;
    call.layer = layer;
    for (auto [id, t] : seqs) call.sequences.push_back({id, Oracle(id).position(layer), t});
    const int64_t total = x.tokens;
    call.qkv = {x.dtype, {total, config_.channels()}, x.qkv_bytes.data(), x.qkv_bytes.size()};
    call.a = {x.dtype, {total, config_.num_v_heads}, x.a_bytes.data(), x.a_bytes.size()};
    call.b = {x.dtype, {total, config_.num_v_heads}, x.b_bytes.data(), x.b_bytes.size()};
    call.out_dtype = DType::kFloat32;
    return call;
  }

  OracleSequence& Oracle(uint64_t id) {
    auto it = oracles_.find(id);
    if (it == oracles_.end()) it = oracles_.emplace(id, OracleSequence(config_, &params_)).first;
    return it->second;
  }

  // Opens sequences in the engine and the oracle.
  void Open(const std::vector<uint64_t>& ids) {
    ASSERT_TRUE(engine_->Open("", ids).ok());
    for (uint64_t id : ids) {
      oracles_.erase(id);
      Oracle(id);
    }
  }

  // Runs a committed step (Prefill or DecodeStep) on every layer for `seqs` and returns the worst
  // relative error against the oracle; the oracle advances too.
  double Step(StepKind kind, const std::vector<std::pair<uint64_t, int32_t>>& seqs,
              DType dtype = DType::kFloat32) {
    double worst = 0;
    for (int32_t l = 0; l < config_.num_layers; ++l) {
      worst = std::max(worst, StepLayer(kind, l, seqs, dtype));
    }
    return worst;
  }

  // One layer of a step. For kVerify, the oracle is evaluated on copies and the drafts are kept
  // until Commit.
  double StepLayer(StepKind kind, int32_t layer,
                   const std::vector<std::pair<uint64_t, int32_t>>& seqs, DType dtype) {
    int32_t total = 0;
    for (auto [id, t] : seqs) total += t;
    Activations x = MakeActivations(total, dtype);
    LayerCall call = MakeCall(layer, seqs, x);
    absl::StatusOr<LayerResult> r = kind == StepKind::kPrefill ? engine_->Prefill(call)
                                    : kind == StepKind::kDecode ? engine_->DecodeStep(call)
                                                                : engine_->VerifyDrafts(call);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return 1e30;
    return Check(kind, layer, seqs, x, *r);
  }

  // Compares a result with the oracle and advances it (drafts only on copies).
  double Check(StepKind kind, int32_t layer, const std::vector<std::pair<uint64_t, int32_t>>& seqs,
               const Activations& x, const LayerResult& r) {
    const int32_t ch = config_.channels(), hv = config_.num_v_heads, oe = config_.out_elems();
    const float* out = reinterpret_cast<const float*>(r.out.bytes.data());
    double worst = 0;
    int32_t off = 0;
    for (auto [id, t] : seqs) {
      std::vector<double> want;
      if (kind == StepKind::kVerify) {
        OracleSequence copy = Oracle(id);
        want = copy.Append(layer, &x.qkv[off * ch], &x.a[off * hv], &x.b[off * hv], t);
        Draft& d = drafts_[{id, layer}];
        d.qkv.assign(&x.qkv[off * ch], &x.qkv[(off + t) * ch]);
        d.a.assign(&x.a[off * hv], &x.a[(off + t) * hv]);
        d.b.assign(&x.b[off * hv], &x.b[(off + t) * hv]);
        d.tokens = t;
      } else {
        want = Oracle(id).Append(layer, &x.qkv[off * ch], &x.a[off * hv], &x.b[off * hv], t);
      }
      worst = std::max(worst, RelativeError(out + static_cast<size_t>(off) * oe, want.data(),
                                            want.size()));
      off += t;
    }
    return worst;
  }

  // Commits `accepted` drafts of each sequence in the engine and the oracle.
  absl::Status Commit(const std::vector<std::pair<uint64_t, int32_t>>& accepted) {
    std::vector<CommitItem> items;
    for (auto [id, a] : accepted) items.push_back({id, Oracle(id).position(0), a});
    absl::Status s = engine_->CommitDrafts("", items);
    if (!s.ok()) return s;
    for (auto [id, a] : accepted) {
      for (int32_t l = 0; l < config_.num_layers; ++l) {
        Draft& d = drafts_[{id, l}];
        if (a > 0) Oracle(id).Append(l, d.qkv.data(), d.a.data(), d.b.data(), a);
        drafts_.erase({id, l});
      }
    }
    return s;
  }

 private:
  struct Draft {
    std::vector<float> qkv, a, b;
    int32_t tokens = 0;
  };
  Engine* engine_;
  ModelConfig config_;
  std::vector<LayerParams> params_;
  std::mt19937 rng_;
  std::map<uint64_t, OracleSequence> oracles_;
  std::map<std::pair<uint64_t, int32_t>, Draft> drafts_;
};

}  // namespace kvbuffer::testing
