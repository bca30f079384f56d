#include "service/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvbuffer {
namespace {

const char* KindName(StepKind kind) {
  switch (kind) {
    case StepKind::kDecode: return "DecodeStep";
    case StepKind::kVerify: return "VerifyDrafts";
    case StepKind::kPrefill: return "Prefill";
  }
  return "?";
}

int64_t ShapeElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Checks one activation tensor: dtype, shape [rows, cols] and byte count.
absl::Status CheckTensor(const char* name, const TensorView& t, DType dtype, int64_t rows,
                         int64_t cols) {
  if (t.dtype != DType::kFloat32 && t.dtype != DType::kFloat16 && t.dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".dtype must be FP32, FP16 or BF16"));
  }
  if (t.dtype != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".dtype is ", DTypeName(t.dtype),
                                                   " but qkv.dtype is ", DTypeName(dtype),
                                                   "; qkv, a and b must share one dtype"));
  }
  std::vector<int64_t> want = {rows, cols};
  if (t.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".shape must be ", ShapeString(want),
                                                   ", got ", ShapeString(t.shape)));
  }
  const size_t bytes = static_cast<size_t>(ShapeElements(want)) * DTypeSize(dtype);
  if (t.size_bytes != bytes || (bytes > 0 && t.data == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".data has ", t.size_bytes,
                                                   " bytes, expected ", bytes, " for shape ",
                                                   ShapeString(want), " ", DTypeName(dtype)));
  }
  return absl::OkStatus();
}

// Rejects NaN, Inf and finite values of magnitude 2^kActivationMagnitudeLog2 or more before they
// can reach a state (an exponent-bits test, no conversions). FP16 cannot hold such a value, so
// there only NaN and Inf are refused.
absl::Status CheckActivationValues(const char* name, const TensorView& t) {
  static_assert(kActivationMagnitudeLog2 > 16 && kActivationMagnitudeLog2 < 127);
  const size_t n = t.size_bytes / DTypeSize(t.dtype);
  size_t bad = n;
  if (t.dtype == DType::kFloat32) {
    // |x| >= 2^k (Inf and NaN included) <=> the bits without the sign are >= those of 2^k.
    constexpr uint32_t limit = uint32_t{127 + kActivationMagnitudeLog2} << 23;
    const auto* w = static_cast<const uint32_t*>(t.data);
    uint32_t any = 0;
    for (size_t i = 0; i < n; ++i) any |= ((w[i] & 0x7fffffffu) >= limit);
    if (any) {
      for (bad = 0; (w[bad] & 0x7fffffffu) < limit; ++bad) {
      }
    }
  } else {
    const uint16_t limit = t.dtype == DType::kBFloat16
                               ? static_cast<uint16_t>((127 + kActivationMagnitudeLog2) << 7)
                               : uint16_t{0x7c00};  // FP16: Inf and NaN
    const auto* h = static_cast<const uint16_t*>(t.data);
    uint32_t any = 0;
    for (size_t i = 0; i < n; ++i) any |= ((h[i] & 0x7fffu) >= limit);
    if (any) {
      for (bad = 0; (h[bad] & 0x7fffu) < limit; ++bad) {
      }
    }
  }
  if (bad < n) {
    const float v = LoadAsFloat(t.data, t.dtype, bad);
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " holds a non-finite value (", v, ") at element ", bad));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        name, " holds ", v, " at element ", bad, "; activations must have |x| < 2^",
        kActivationMagnitudeLog2, " (", static_cast<int64_t>(kMaxActivationMagnitude), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

Engine::Engine(EngineOptions options, std::unique_ptr<Backend> backend)
    : options_(std::move(options)),
      backend_(std::move(backend)),
      conv_pool_(options_.max_sequences),
      state_pool_(options_.state_slots),
      page_pool_(options_.buffer_pages) {}

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options,
                                                       std::unique_ptr<Backend> backend) {
  if (absl::Status s = ValidateEngineOptions(options); !s.ok()) return s;
  if (backend == nullptr) return absl::InvalidArgumentError("backend must not be null");
  if (options.params.empty()) options.params = MakeAllLayerParams(options.model);
  PoolSizes sizes;
  sizes.state_slots = options.state_slots;
  sizes.buffer_pages = options.buffer_pages;
  sizes.page_tokens = options.page_tokens;
  sizes.conv_slots = options.max_sequences;
  sizes.max_drafts = options.max_drafts;
  sizes.buffer_dtype = options.buffer_dtype;
  sizes.conv_dtype = options.conv_dtype;
  if (absl::Status s = backend->Allocate(options.model, options.params, sizes); !s.ok()) {
    return s;
  }
  std::unique_ptr<Engine> engine(new Engine(std::move(options), std::move(backend)));
  engine->element_bytes_ = ComputePoolElementBytes(engine->options_.model, sizes);
  return engine;
}

void Engine::SetClockForTesting(absl::Time (*now)()) { now_ = now; }

int32_t Engine::PagesFor(int32_t rows) const {
  return (rows + options_.page_tokens - 1) / options_.page_tokens;
}

void Engine::Release(Sequence* seq) {
  for (int32_t p : seq->pages) page_pool_.Give(p);
  seq->pages.clear();
  if (seq->state_slot >= 0) state_pool_.Give(seq->state_slot);
  seq->state_slot = -1;
  if (seq->conv_slot >= 0) conv_pool_.Give(seq->conv_slot);
  seq->conv_slot = -1;
}

absl::Status Engine::ResizePages(Sequence* seq, int32_t rows) {
  const int32_t want = PagesFor(rows);
  while (static_cast<int32_t>(seq->pages.size()) > want) {
    page_pool_.Give(seq->pages.back());
    seq->pages.pop_back();
  }
  while (static_cast<int32_t>(seq->pages.size()) < want) {
    if (page_pool_.free() == 0) return absl::ResourceExhaustedError("buffer page pool is full");
    seq->pages.push_back(page_pool_.Take());
  }
  return absl::OkStatus();
}

absl::Status Engine::Open(const std::string& tenant, const std::vector<uint64_t>& ids) {
  absl::MutexLock lock(&mu_);
  if (ids.empty()) return absl::InvalidArgumentError("ids must not be empty");
  std::set<uint64_t> seen;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError(absl::StrCat("ids[", i, "] repeats id ", ids[i]));
    }
    if (table_.Find(tenant, ids[i]) != nullptr) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", ids[i], " is already open"));
    }
  }
  if (options_.max_sequences_per_tenant > 0 &&
      table_.CountTenant(tenant) + static_cast<int32_t>(ids.size()) >
          options_.max_sequences_per_tenant) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant quota: ", table_.CountTenant(tenant), " sequences open, ", ids.size(),
        " asked, max_sequences_per_tenant=", options_.max_sequences_per_tenant));
  }
  if (conv_pool_.free() < static_cast<int32_t>(ids.size())) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "sequence table is full: ", ids.size(), " sequences asked, ", conv_pool_.free(),
        " free of max_sequences=", options_.max_sequences));
  }
  std::vector<int32_t> slots;
  for (uint64_t id : ids) {
    Sequence* seq = table_.Insert(tenant, id);
    seq->layers.resize(options_.model.num_layers);
    seq->conv_slot = conv_pool_.Take();
    seq->last_used = now_();
    slots.push_back(seq->conv_slot);
  }
  if (absl::Status s = backend_->ResetConv(slots); !s.ok()) {
    for (uint64_t id : ids) {
      Release(table_.Find(tenant, id));
      table_.Erase(tenant, id);
    }
    return s;
  }
  return absl::OkStatus();
}

absl::Status Engine::Close(const std::string& tenant, const std::vector<uint64_t>& ids) {
  absl::MutexLock lock(&mu_);
  if (ids.empty()) return absl::InvalidArgumentError("ids must not be empty");
  std::set<uint64_t> seen;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError(absl::StrCat("ids[", i, "] repeats id ", ids[i]));
    }
    if (table_.Find(tenant, ids[i]) == nullptr) {
      return absl::NotFoundError(absl::StrCat("sequence ", ids[i], " is not open"));
    }
  }
  for (uint64_t id : ids) {
    Release(table_.Find(tenant, id));
    table_.Erase(tenant, id);
  }
  return absl::OkStatus();
}

absl::StatusOr<LayerResult> Engine::Prefill(const LayerCall& call) {
  return RunLayer(call, StepKind::kPrefill);
}

absl::StatusOr<LayerResult> Engine::DecodeStep(const LayerCall& call) {
  return RunLayer(call, StepKind::kDecode);
}

absl::StatusOr<LayerResult> Engine::VerifyDrafts(const LayerCall& call) {
  return RunLayer(call, StepKind::kVerify);
}

absl::Status Engine::ValidateActivations(const LayerCall& call, int64_t total_tokens) const {
  const DType dtype = call.qkv.dtype;
  if (absl::Status s = CheckTensor("qkv", call.qkv, dtype, total_tokens, options_.model.channels());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckTensor("a", call.a, dtype, total_tokens, options_.model.num_v_heads);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckTensor("b", call.b, dtype, total_tokens, options_.model.num_v_heads);
      !s.ok()) {
    return s;
  }
  if (call.out_dtype != DType::kFloat32 && call.out_dtype != DType::kFloat16 &&
      call.out_dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError("output_dtype must be FP32, FP16 or BF16");
  }
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"qkv", &call.qkv},
                         {"a", &call.a},
                         {"b", &call.b}}) {
    if (absl::Status s = CheckActivationValues(name, *t); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<LayerResult> Engine::Replay(const LayerCall& call, std::vector<Sequence*>& seqs) {
  const int32_t out_elems = options_.model.out_elems();
  int64_t total = 0;
  for (const auto& s : call.sequences) total += s.num_tokens;
  LayerResult result;
  result.replayed = true;
  result.out.dtype = call.out_dtype;
  result.out.shape = {total, options_.model.num_v_heads, options_.model.head_v_dim};
  result.out.bytes.resize(static_cast<size_t>(total) * out_elems * DTypeSize(call.out_dtype));
  size_t offset = 0;  // in elements
  for (size_t i = 0; i < seqs.size(); ++i) {
    const ReplayEntry& r = seqs[i]->replay;
    if (!r.outputs_kept) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequences[", i, "]: this call was already applied to sequence ", seqs[i]->id,
          " at position ", r.position, " on layer ", r.layer,
          ", and outputs of calls over replay_max_tokens=", options_.replay_max_tokens,
          " tokens are not kept"));
    }
    const size_t n = static_cast<size_t>(r.num_tokens) * out_elems;
    for (size_t e = 0; e < n; ++e) {
      StoreFromFloat(result.out.bytes.data(), call.out_dtype, offset + e,
                     LoadAsFloat(r.out.data(), r.out_dtype, e));
    }
    offset += n;
    result.positions.push_back(seqs[i]->layers[call.layer].position);
  }
  return result;
}

absl::StatusOr<LayerResult> Engine::RunLayer(const LayerCall& call, StepKind kind) {
  const ModelConfig& m = options_.model;
  const char* rpc = KindName(kind);
  if (call.layer < 0 || call.layer >= m.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(rpc, ": layer must be in [0, ", m.num_layers, "), got ", call.layer));
  }
  if (call.sequences.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(rpc, ": sequences must not be empty"));
  }
  // Token counts per kind.
  int64_t total_tokens = 0;
  for (size_t i = 0; i < call.sequences.size(); ++i) {
    const int32_t t = call.sequences[i].num_tokens;
    if (kind == StepKind::kDecode && t != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequences[", i, "].num_tokens must be 1 for DecodeStep, got ", t));
    }
    if (kind == StepKind::kVerify && (t < 1 || t > options_.max_drafts)) {
      return absl::InvalidArgumentError(absl::StrCat("sequences[", i,
                                                     "].num_tokens must be in [1, max_drafts=",
                                                     options_.max_drafts, "], got ", t));
    }
    if (kind == StepKind::kPrefill && (t < 1 || t > (1 << 24))) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequences[", i, "].num_tokens must be in [1, 16777216], got ", t));
    }
    if (call.sequences[i].position < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sequences[", i, "].position must be >= 0, got ",
                                                     call.sequences[i].position));
    }
    total_tokens += t;
  }
  if (total_tokens > std::numeric_limits<int32_t>::max() / std::max(1, m.channels())) {
    return absl::InvalidArgumentError(
        absl::StrCat(rpc, ": too many tokens in one call (", total_tokens, ")"));
  }
  if (absl::Status s = ValidateActivations(call, total_tokens); !s.ok()) return s;

  absl::MutexLock lock(&mu_);
  // Look every sequence up; ids may not repeat within a call.
  std::vector<Sequence*> seqs(call.sequences.size());
  {
    std::set<uint64_t> seen;
    for (size_t i = 0; i < call.sequences.size(); ++i) {
      const uint64_t id = call.sequences[i].id;
      if (!seen.insert(id).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequences[", i, "].id repeats sequence ", id));
      }
      seqs[i] = table_.Find(call.tenant, id);
      if (seqs[i] == nullptr) {
        return absl::NotFoundError(absl::StrCat("sequences[", i, "].id: sequence ", id,
                                                " is not open"));
      }
    }
  }
  // A retry of the last applied call is answered from the replay record, once for all.
  size_t replays = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = *seqs[i];
    const ReplayEntry& r = s.replay;
    const LayerCursor& c = s.layers[call.layer];
    const SequenceTokens& st = call.sequences[i];
    const bool same_call = r.valid && r.kind == kind && r.layer == call.layer &&
                           r.position == st.position && r.num_tokens == st.num_tokens;
    const bool still_after = kind == StepKind::kVerify
                                 ? (c.position == st.position && c.pending == st.num_tokens)
                                 : (c.position == st.position + st.num_tokens && c.pending == 0);
    if (same_call && still_after) ++replays;
  }
  if (replays == seqs.size()) {
    for (Sequence* s : seqs) s->last_used = now_();
    return Replay(call, seqs);
  }
  // Positions and pending drafts.
  for (size_t i = 0; i < seqs.size(); ++i) {
    const LayerCursor& c = seqs[i]->layers[call.layer];
    const SequenceTokens& st = call.sequences[i];
    if (c.position != st.position) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequences[", i, "].position is ", st.position, " but sequence ", st.id,
          " is at position ", c.position, " on layer ", call.layer));
    }
    if (c.pending != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", st.id, " has ", c.pending, " uncommitted drafts on layer ", call.layer,
          " at position ", c.position, "; call CommitDrafts first"));
    }
  }
  // Plan every item and count what must be allocated.
  items_.clear();
  items_.resize(seqs.size());
  std::vector<int32_t> rows_after(seqs.size());
  int32_t new_states = 0;
  int64_t new_pages = 0;
  int32_t token_offset = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = *seqs[i];
    const LayerCursor& c = s.layers[call.layer];
    StepItem& it = items_[i];
    const int32_t t = call.sequences[i].num_tokens;
    const int32_t limit = c.state_valid ? options_.flush_interval : options_.stateless_limit;
    it.token_offset = token_offset;
    it.num_tokens = t;
    it.buffer_rows = c.buffer_rows;
    it.conv_slot = s.conv_slot;
    bool needs_state = false;
    if (kind == StepKind::kPrefill && c.buffer_rows + t > limit) {
      // Chunked path: fold the buffer, run the UT form, keep t mod C rows as the new buffer.
      it.chunked = true;
      it.fold_first = c.buffer_rows > 0 || !c.state_valid;
      const int32_t tail = t % options_.flush_interval;
      it.fold_tokens = t - tail;
      rows_after[i] = tail;
      needs_state = true;
    } else if (c.buffer_rows + t > limit) {
      it.fold_first = true;
      rows_after[i] = t;
      needs_state = true;
    } else {
      rows_after[i] = c.buffer_rows + t;
    }
    if (needs_state) {
      it.state_is_new = !c.state_valid;
      if (s.state_slot < 0) ++new_states;
    }
    // Pages: the sequence's rows on every layer, with this layer's rows after the call.
    int32_t rows = rows_after[i];
    for (int32_t l = 0; l < m.num_layers; ++l) {
      if (l != call.layer) rows = std::max(rows, s.layers[l].buffer_rows + s.layers[l].pending);
    }
    new_pages += std::max<int64_t>(0, PagesFor(rows) - static_cast<int64_t>(s.pages.size()));
    token_offset += t;
  }
  if (new_states > state_pool_.free()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "state pool is full: ", rpc, " needs ", new_states, " new state slots, ",
        state_pool_.free(), " free of state_slots=", options_.state_slots));
  }
  if (new_pages > page_pool_.free()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "buffer page pool is full: ", rpc, " needs ", new_pages, " new pages, ",
        page_pool_.free(), " free of buffer_pages=", options_.buffer_pages));
  }
  // Allocate (cannot fail now) and build the step.
  std::vector<std::pair<Sequence*, int32_t>> fresh_states;
  std::vector<size_t> pages_before(seqs.size());
  page_table_.clear();
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = *seqs[i];
    StepItem& it = items_[i];
    pages_before[i] = s.pages.size();
    if ((it.fold_first || it.chunked) && s.state_slot < 0) {
      s.state_slot = state_pool_.Take();
      fresh_states.push_back({&s, s.state_slot});
    }
    const LayerCursor& c = s.layers[call.layer];
    it.state_slot = (c.state_valid || it.fold_first || it.chunked) ? s.state_slot : -1;
    int32_t rows = rows_after[i];
    for (int32_t l = 0; l < m.num_layers; ++l) {
      if (l != call.layer) rows = std::max(rows, s.layers[l].buffer_rows + s.layers[l].pending);
    }
    rows = std::max(rows, c.buffer_rows);  // the old rows stay readable during the call
    while (static_cast<int32_t>(s.pages.size()) < PagesFor(rows)) {
      s.pages.push_back(page_pool_.Take());
    }
    it.page_offset = static_cast<int32_t>(page_table_.size());
    it.num_pages = static_cast<int32_t>(s.pages.size());
    page_table_.insert(page_table_.end(), s.pages.begin(), s.pages.end());
  }
  LayerResult result;
  result.out.dtype = call.out_dtype;
  result.out.shape = {total_tokens, m.num_v_heads, m.head_v_dim};
  result.out.bytes.resize(static_cast<size_t>(total_tokens) * m.out_elems() *
                          DTypeSize(call.out_dtype));
  LayerStep step;
  step.layer = call.layer;
  step.kind = kind;
  step.items = items_;
  step.page_table = page_table_;
  step.in_dtype = call.qkv.dtype;
  step.qkv = call.qkv.data;
  step.a = call.a.data;
  step.b = call.b.data;
  step.total_tokens = static_cast<int32_t>(total_tokens);
  step.out_dtype = call.out_dtype;
  step.out = result.out.bytes.data();
  if (absl::Status s = backend_->RunLayerStep(step); !s.ok()) {
    // Undo the allocations; the call changed no sequence's bookkeeping.
    for (size_t i = 0; i < seqs.size(); ++i) {
      while (seqs[i]->pages.size() > pages_before[i]) {
        page_pool_.Give(seqs[i]->pages.back());
        seqs[i]->pages.pop_back();
      }
    }
    for (auto& [seq, slot] : fresh_states) {
      state_pool_.Give(slot);
      seq->state_slot = -1;
    }
    return s;
  }
  // Commit the bookkeeping.
  const absl::Time now = now_();
  const size_t out_row_bytes = static_cast<size_t>(m.out_elems()) * DTypeSize(call.out_dtype);
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = *seqs[i];
    const StepItem& it = items_[i];
    LayerCursor& c = s.layers[call.layer];
    if (it.fold_first || it.chunked) {
      if (it.fold_first && (it.buffer_rows > 0 || it.state_is_new)) ++flushes_;
      c.state_valid = true;
    }
    if (kind == StepKind::kVerify) {
      c.buffer_rows = it.fold_first ? 0 : c.buffer_rows;
      c.pending = it.num_tokens;
      drafts_verified_ += it.num_tokens;
    } else {
      c.buffer_rows = rows_after[i];
      c.position += it.num_tokens;
    }
    ResizePages(&s, s.RowsNeeded()).IgnoreError();  // only shrinks here
    ReplayEntry& r = s.replay;
    r.valid = true;
    r.kind = kind;
    r.layer = call.layer;
    r.position = call.sequences[i].position;
    r.num_tokens = it.num_tokens;
    r.out_dtype = call.out_dtype;
    r.outputs_kept = it.num_tokens <= options_.replay_max_tokens;
    if (r.outputs_kept) {
      r.out.assign(result.out.bytes.data() + it.token_offset * out_row_bytes,
                   static_cast<size_t>(it.num_tokens) * out_row_bytes);
    } else {
      r.out.clear();
      r.out.shrink_to_fit();
    }
    s.last_used = now;
    result.positions.push_back(c.position);
  }
  return result;
}

absl::Status Engine::CommitDrafts(const std::string& tenant, const std::vector<CommitItem>& items) {
  absl::MutexLock lock(&mu_);
  if (items.empty()) return absl::InvalidArgumentError("items must not be empty");
  const int32_t num_layers = options_.model.num_layers;
  std::vector<Sequence*> seqs(items.size());
  std::vector<bool> replay(items.size(), false);
  std::set<uint64_t> seen;
  for (size_t i = 0; i < items.size(); ++i) {
    const CommitItem& ci = items[i];
    if (!seen.insert(ci.id).second) {
      return absl::InvalidArgumentError(absl::StrCat("items[", i, "].id repeats sequence ", ci.id));
    }
    Sequence* s = table_.Find(tenant, ci.id);
    if (s == nullptr) {
      return absl::NotFoundError(absl::StrCat("items[", i, "].id: sequence ", ci.id,
                                              " is not open"));
    }
    if (ci.accepted < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("items[", i, "].accepted must be >= 0, got ", ci.accepted));
    }
    seqs[i] = s;
    bool none_pending = true;
    bool all_at_after = true;
    for (const LayerCursor& c : s->layers) {
      none_pending = none_pending && c.pending == 0;
      all_at_after = all_at_after && c.position == ci.position + ci.accepted;
    }
    if (none_pending && all_at_after && s->last_commit_position == ci.position &&
        s->last_commit_accepted == ci.accepted) {
      replay[i] = true;  // this commit was applied already
      continue;
    }
    const int32_t drafts = s->layers[0].pending;
    for (int32_t l = 0; l < num_layers; ++l) {
      const LayerCursor& c = s->layers[l];
      if (c.pending == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "items[", i, "]: sequence ", ci.id, " has no drafts pending on layer ", l,
            " (VerifyDrafts must run on every layer before CommitDrafts)"));
      }
      if (c.pending != drafts) {
        return absl::FailedPreconditionError(absl::StrCat(
            "items[", i, "]: sequence ", ci.id, " has ", c.pending, " drafts pending on layer ", l,
            " but ", drafts, " on layer 0"));
      }
      if (c.position != ci.position) {
        return absl::FailedPreconditionError(absl::StrCat(
            "items[", i, "].position is ", ci.position, " but sequence ", ci.id,
            " is at position ", c.position, " on layer ", l));
      }
    }
    if (ci.accepted > drafts) {
      return absl::OutOfRangeError(absl::StrCat("items[", i, "].accepted is ", ci.accepted,
                                                " but sequence ", ci.id, " has only ", drafts,
                                                " drafts pending"));
    }
  }
  std::vector<ConvCommitItem> conv;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!replay[i]) {
      conv.push_back({seqs[i]->conv_slot, items[i].accepted, seqs[i]->layers[0].pending});
    }
  }
  for (int32_t l = 0; l < num_layers && !conv.empty(); ++l) {
    if (absl::Status s = backend_->CommitConv(l, conv); !s.ok()) return s;
  }
  const absl::Time now = now_();
  for (size_t i = 0; i < items.size(); ++i) {
    Sequence& s = *seqs[i];
    s.last_used = now;
    if (replay[i]) continue;
    for (LayerCursor& c : s.layers) {
      c.buffer_rows += items[i].accepted;
      c.position += items[i].accepted;
      c.pending = 0;
    }
    drafts_accepted_ += items[i].accepted;
    s.last_commit_position = items[i].position;
    s.last_commit_accepted = items[i].accepted;
    s.replay.valid = false;  // a retried VerifyDrafts after a commit is a position mismatch
    ResizePages(&s, s.RowsNeeded()).IgnoreError();  // only shrinks here
  }
  return absl::OkStatus();
}

absl::Status Engine::Flush(const std::string& tenant, const std::vector<uint64_t>& ids) {
  absl::MutexLock lock(&mu_);
  if (ids.empty()) return absl::InvalidArgumentError("ids must not be empty");
  std::vector<Sequence*> seqs;
  std::set<uint64_t> seen;
  int32_t new_states = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError(absl::StrCat("ids[", i, "] repeats id ", ids[i]));
    }
    Sequence* s = table_.Find(tenant, ids[i]);
    if (s == nullptr) {
      return absl::NotFoundError(absl::StrCat("ids[", i, "]: sequence ", ids[i], " is not open"));
    }
    bool needs_fold = false;
    for (size_t l = 0; l < s->layers.size(); ++l) {
      if (s->layers[l].pending != 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "sequence ", ids[i], " has ", s->layers[l].pending, " uncommitted drafts on layer ", l,
            "; call CommitDrafts first"));
      }
      needs_fold = needs_fold || s->layers[l].buffer_rows > 0;
    }
    if (needs_fold && s->state_slot < 0) ++new_states;
    seqs.push_back(s);
  }
  if (new_states > state_pool_.free()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "state pool is full: Flush needs ", new_states, " new state slots, ", state_pool_.free(),
        " free of state_slots=", options_.state_slots));
  }
  std::vector<std::pair<Sequence*, int32_t>> fresh;
  for (Sequence* s : seqs) {
    if (s->RowsNeeded() > 0 && s->state_slot < 0) {
      s->state_slot = state_pool_.Take();
      fresh.push_back({s, s->state_slot});
    }
  }
  std::vector<FoldItem> folds;
  for (int32_t l = 0; l < options_.model.num_layers; ++l) {
    folds.clear();
    page_table_.clear();
    for (Sequence* s : seqs) {
      const LayerCursor& c = s->layers[l];
      if (c.buffer_rows == 0) continue;
      FoldItem f;
      f.state_slot = s->state_slot;
      f.state_is_new = !c.state_valid;
      f.buffer_rows = c.buffer_rows;
      f.page_offset = static_cast<int32_t>(page_table_.size());
      f.num_pages = static_cast<int32_t>(s->pages.size());
      page_table_.insert(page_table_.end(), s->pages.begin(), s->pages.end());
      folds.push_back(f);
    }
    if (folds.empty()) continue;
    if (absl::Status st = backend_->FoldBuffers(l, folds, page_table_); !st.ok()) {
      // Layers before l are folded already; a device failure here is fatal for these sequences.
      return st;
    }
    for (Sequence* s : seqs) {
      LayerCursor& c = s->layers[l];
      if (c.buffer_rows == 0) continue;
      c.buffer_rows = 0;
      c.state_valid = true;
      ++flushes_;
    }
  }
  const absl::Time now = now_();
  for (Sequence* s : seqs) {
    s->last_used = now;
    ResizePages(s, s->RowsNeeded()).IgnoreError();  // only shrinks here
  }
  return absl::OkStatus();
}

absl::StatusOr<SequenceInfo> Engine::Describe(const std::string& tenant, uint64_t id) {
  absl::MutexLock lock(&mu_);
  Sequence* s = table_.Find(tenant, id);
  if (s == nullptr) return absl::NotFoundError(absl::StrCat("sequence ", id, " is not open"));
  SequenceInfo info;
  info.id = id;
  for (const LayerCursor& c : s->layers) {
    info.positions.push_back(c.position);
    info.pending_drafts = std::max(info.pending_drafts, c.pending);
  }
  info.has_state = s->state_slot >= 0;
  info.buffer_pages = static_cast<int32_t>(s->pages.size());
  info.bytes = element_bytes_.conv_slot + (info.has_state ? element_bytes_.state_slot : 0) +
               info.buffer_pages * element_bytes_.buffer_page;
  return info;
}

std::vector<SequenceKey> Engine::ListSequences() {
  absl::MutexLock lock(&mu_);
  std::vector<SequenceKey> keys;
  keys.reserve(table_.all().size());
  for (const auto& [key, seq] : table_.all()) keys.push_back({key.first, key.second});
  return keys;
}

EngineInfo Engine::Info() {
  absl::MutexLock lock(&mu_);
  EngineInfo info;
  info.options = options_;
  info.options.params.clear();  // large, and not what callers of Info want
  info.backend = backend_->Name();
  info.element_bytes = element_bytes_;
  info.open_sequences = table_.size();
  info.free_conv_slots = conv_pool_.free();
  info.free_state_slots = state_pool_.free();
  info.free_buffer_pages = page_pool_.free();
  info.memory = backend_->Memory();
  info.flushes = flushes_;
  info.drafts_verified = drafts_verified_;
  info.drafts_accepted = drafts_accepted_;
  return info;
}

int32_t Engine::OpenSequencesOf(const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  return table_.CountTenant(tenant);
}

CapacityEstimate Engine::EstimateCapacity(int64_t length, int32_t drafts) {
  absl::MutexLock lock(&mu_);
  FreePools free{conv_pool_.free(), state_pool_.free(), page_pool_.free()};
  return kvbuffer::EstimateCapacity(options_, element_bytes_, length, drafts, free,
                                    PoolBudgetBytes(options_, element_bytes_));
}

int32_t Engine::ReclaimIdle(absl::Time now) {
  absl::MutexLock lock(&mu_);
  std::vector<SequenceTable::Key> idle;
  for (auto& [key, seq] : table_.all()) {
    if (now - seq->last_used >= options_.idle_ttl) idle.push_back(key);
  }
  for (const auto& key : idle) {
    Release(table_.Find(key.first, key.second));
    table_.Erase(key.first, key.second);
  }
  return static_cast<int32_t>(idle.size());
}

}  // namespace kvbuffer
