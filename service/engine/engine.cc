#include "service/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "service/engine/activation_check.h"

namespace kvbuffer {
namespace {

// Output blocks: at most kPooledBlocks unreferenced ones are kept for reuse, none larger than
// kPooledBlockBytes (larger ones are plain memory, freed once unreferenced).
constexpr size_t kPooledBlocks = 8;
constexpr size_t kPooledBlockBytes = size_t{64} << 20;

const char* KindName(StepKind kind) {
  switch (kind) {
    case StepKind::kDecode:
      return "DecodeStep";
    case StepKind::kVerify:
      return "VerifyDrafts";
    case StepKind::kPrefill:
      return "Prefill";
  }
  return "?";
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
  // The shape vector is built only for messages: no allocation on the per-step path.
  if (t.shape.size() != 2 || t.shape[0] != rows || t.shape[1] != cols) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ".shape must be ", ShapeString({rows, cols}), ", got ", ShapeString(t.shape)));
  }
  const size_t bytes = static_cast<size_t>(rows * cols) * DTypeSize(dtype);
  if (t.size_bytes != bytes || (bytes > 0 && t.data == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".data has ", t.size_bytes, " bytes, expected ", bytes, " for shape ",
                     ShapeString({rows, cols}), " ", DTypeName(dtype)));
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

Engine::~Engine() {
  absl::MutexLock lock(&mu_);
  for (auto& [key, seq] : table_.all()) DropReplayOutputs(seq.get());
  for (HostBlock* b : free_blocks_) FreeBlock(b);
  free_blocks_.clear();
  absl::MutexLock stage_lock(&stage_mu_);
  for (HostBlock* b : free_stages_) FreeBlock(b);
  free_stages_.clear();
}

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
  engine->check_values_ = !engine->backend_->ChecksActivationValues();
  engine->stage_inputs_ = engine->check_values_ && engine->backend_->PrefersHostBufferInputs();
  return engine;
}

void Engine::SetClockForTesting(absl::Time (*now)()) { now_ = now; }

int32_t Engine::PagesFor(int32_t rows) const {
  return (rows + options_.page_tokens - 1) / options_.page_tokens;
}

HostBlock* Engine::TakeBlock(size_t bytes) {
  // The smallest pooled block that fits.
  size_t best = free_blocks_.size();
  for (size_t i = 0; i < free_blocks_.size(); ++i) {
    if (free_blocks_[i]->capacity >= bytes &&
        (best == free_blocks_.size() || free_blocks_[i]->capacity < free_blocks_[best]->capacity)) {
      best = i;
    }
  }
  if (best < free_blocks_.size()) {
    HostBlock* b = free_blocks_[best];
    free_blocks_[best] = free_blocks_.back();
    free_blocks_.pop_back();
    return b;
  }
  return NewBlock(bytes);
}

HostBlock* Engine::NewBlock(size_t bytes) {
  // Room to grow a little, in whole pages.
  const size_t capacity = (std::max<size_t>(bytes + bytes / 8, 1) + 4095) / 4096 * 4096;
  auto b = std::make_unique<HostBlock>();
  if (capacity <= kPooledBlockBytes) {
    b->data = static_cast<uint8_t*>(backend_->AllocateHostBuffer(capacity));
    b->backend_memory = b->data != nullptr;
  }
  if (b->data == nullptr) b->data = static_cast<uint8_t*>(std::aligned_alloc(4096, capacity));
  if (b->data == nullptr) return nullptr;
  b->capacity = capacity;
  return b.release();
}

HostBlock* Engine::TakeInputStage(size_t bytes) {
  {
    absl::MutexLock lock(&stage_mu_);
    for (size_t i = 0; i < free_stages_.size(); ++i) {
      if (free_stages_[i]->capacity >= bytes) {
        HostBlock* b = free_stages_[i];
        free_stages_[i] = free_stages_.back();
        free_stages_.pop_back();
        return b;
      }
    }
  }
  if (bytes > kPooledBlockBytes) return nullptr;  // large prefills are checked in place
  return NewBlock(bytes);
}

void Engine::PutInputStage(HostBlock* b) {
  absl::MutexLock lock(&stage_mu_);
  if (free_stages_.size() < kPooledBlocks) {
    free_stages_.push_back(b);
    return;
  }
  auto smallest = std::min_element(
      free_stages_.begin(), free_stages_.end(),
      [](const HostBlock* x, const HostBlock* y) { return x->capacity < y->capacity; });
  if ((*smallest)->capacity < b->capacity) std::swap(*smallest, b);
  FreeBlock(b);
}

void Engine::FreeBlock(HostBlock* b) {
  if (b->backend_memory) {
    backend_->FreeHostBuffer(b->data);
  } else {
    std::free(b->data);
  }
  delete b;
}

void Engine::PutBlock(HostBlock* b) {
  if (b->refs > 0 && --b->refs > 0) return;
  if (b->capacity > kPooledBlockBytes) {
    FreeBlock(b);
    return;
  }
  if (free_blocks_.size() < kPooledBlocks) {
    free_blocks_.push_back(b);
    return;
  }
  // A full pool keeps its largest blocks.
  auto smallest = std::min_element(
      free_blocks_.begin(), free_blocks_.end(),
      [](const HostBlock* x, const HostBlock* y) { return x->capacity < y->capacity; });
  if ((*smallest)->capacity < b->capacity) std::swap(*smallest, b);
  FreeBlock(b);
}

void Engine::DropReplayOutputs(Sequence* seq) {
  ReplayEntry& r = seq->replay;
  if (r.block != nullptr) PutBlock(r.block);
  r.block = nullptr;
  r.outputs_kept = false;
  r.out_offset = 0;
  r.out_bytes = 0;
}

void Engine::Release(Sequence* seq) {
  DropReplayOutputs(seq);
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
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant quota: ", table_.CountTenant(tenant), " sequences open, ", ids.size(),
                     " asked, max_sequences_per_tenant=", options_.max_sequences_per_tenant));
  }
  if (conv_pool_.free() < static_cast<int32_t>(ids.size())) {
    return absl::ResourceExhaustedError(
        absl::StrCat("sequence table is full: ", ids.size(), " sequences asked, ",
                     conv_pool_.free(), " free of max_sequences=", options_.max_sequences));
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

absl::Status Engine::ValidateActivations(const LayerCall& call, int64_t total_tokens,
                                         HostBlock** stage, const void* inputs[3]) {
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
  const TensorView* tensors[3] = {&call.qkv, &call.a, &call.b};
  const char* names[3] = {"qkv", "a", "b"};
  size_t at[3] = {0, 0, 0};
  if (stage_inputs_) {
    // qkv | a | b at 256-byte aligned offsets (the layout of a CUDA upload).
    size_t bytes = 0;
    for (int i = 0; i < 3; ++i) {
      at[i] = bytes;
      bytes += (tensors[i]->size_bytes + 255) / 256 * 256;
    }
    *stage = TakeInputStage(bytes);
  }
  if (!check_values_) {
    // The backend refuses bad values itself, with the same messages.
    for (int i = 0; i < 3; ++i) inputs[i] = tensors[i]->data;
    return absl::OkStatus();
  }
  for (int i = 0; i < 3; ++i) {
    void* copy_to = *stage != nullptr ? (*stage)->data + at[i] : nullptr;
    if (absl::Status s = CheckActivationValues(names[i], tensors[i]->dtype, tensors[i]->data,
                                               tensors[i]->size_bytes / DTypeSize(dtype), copy_to);
        !s.ok()) {
      return s;
    }
    inputs[i] = copy_to != nullptr ? copy_to : tensors[i]->data;
  }
  return absl::OkStatus();
}

absl::StatusOr<LayerResult> Engine::Replay(const LayerCall& call, std::span<Sequence* const> seqs) {
  const int32_t out_elems = options_.model.out_elems();
  int64_t total = 0;
  for (const auto& s : call.sequences) total += s.num_tokens;
  LayerResult result;
  result.replayed = true;
  result.out.dtype = call.out_dtype;
  result.out.shape = {total, options_.model.num_v_heads, options_.model.head_v_dim};
  result.out.bytes.resize(static_cast<size_t>(total) * out_elems * DTypeSize(call.out_dtype));
  result.positions.reserve(seqs.size());
  size_t offset = 0;  // in elements
  for (size_t i = 0; i < seqs.size(); ++i) {
    const ReplayEntry& r = seqs[i]->replay;
    if (!r.outputs_kept) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequences[", i, "]: this call was already applied to sequence ",
                       seqs[i]->id, " at position ", r.position, " on layer ", r.layer,
                       ", and outputs of calls over replay_max_tokens=", options_.replay_max_tokens,
                       " tokens are not kept"));
    }
    const size_t n = static_cast<size_t>(r.num_tokens) * out_elems;
    const uint8_t* kept = r.block->data + r.out_offset;
    if (r.out_dtype == call.out_dtype) {
      std::memcpy(result.out.bytes.data() + offset * DTypeSize(call.out_dtype), kept, r.out_bytes);
    } else {
      for (size_t e = 0; e < n; ++e) {
        StoreFromFloat(result.out.bytes.data(), call.out_dtype, offset + e,
                       LoadAsFloat(kept, r.out_dtype, e));
      }
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
      return absl::InvalidArgumentError(absl::StrCat(
          "sequences[", i, "].num_tokens must be in [1, max_drafts=", options_.max_drafts,
          "], got ", t));
    }
    if (kind == StepKind::kPrefill && (t < 1 || t > (1 << 24))) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequences[", i, "].num_tokens must be in [1, 16777216], got ", t));
    }
    if (call.sequences[i].position < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequences[", i, "].position must be >= 0, got ", call.sequences[i].position));
    }
    total_tokens += t;
  }
  if (total_tokens > std::numeric_limits<int32_t>::max() / std::max(1, m.channels())) {
    return absl::InvalidArgumentError(
        absl::StrCat(rpc, ": too many tokens in one call (", total_tokens, ")"));
  }
  HostBlock* stage = nullptr;
  struct GiveBack {
    Engine* engine;
    HostBlock** block;
    ~GiveBack() {
      if (*block != nullptr) engine->PutInputStage(*block);
    }
  } give_back{this, &stage};
  const void* inputs[3] = {nullptr, nullptr, nullptr};
  if (absl::Status s = ValidateActivations(call, total_tokens, &stage, inputs); !s.ok()) return s;

  absl::MutexLock lock(&mu_);
  const size_t n = call.sequences.size();
  // Look every sequence up; ids may not repeat within a call (a sequence seen twice carries this
  // call's stamp).
  std::vector<Sequence*>& seqs = seqs_;
  seqs.resize(n);
  {
    const SequenceTable::TenantIds* tenant = table_.Tenant(call.tenant);
    const uint64_t stamp = ++visit_stamp_;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t id = call.sequences[i].id;
      Sequence* s = SequenceTable::Find(tenant, id);
      if (s != nullptr && s->visit == stamp) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequences[", i, "].id repeats sequence ", id));
      }
      if (s == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("sequences[", i, "].id: sequence ", id, " is not open"));
      }
      s->visit = stamp;
      seqs[i] = s;
    }
  }
  // A retry of the last applied call is answered from the replay record, once for all.
  size_t replays = 0;
  for (size_t i = 0; i < n; ++i) {
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
  if (replays == n) {
    const absl::Time now = now_();
    for (Sequence* s : seqs) s->last_used = now;
    return Replay(call, seqs);
  }
  // Positions and pending drafts.
  for (size_t i = 0; i < n; ++i) {
    const LayerCursor& c = seqs[i]->layers[call.layer];
    const SequenceTokens& st = call.sequences[i];
    if (c.position != st.position) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequences[", i, "].position is ", st.position, " but sequence ", st.id,
                       " is at position ", c.position, " on layer ", call.layer));
    }
    if (c.pending != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", st.id, " has ", c.pending, " uncommitted drafts on layer ",
                       call.layer, " at position ", c.position, "; call CommitDrafts first"));
    }
  }
  // Plan every item and count what must be allocated.
  items_.clear();
  items_.resize(n);
  rows_after_.resize(n);
  other_rows_.resize(n);
  int32_t new_states = 0;
  int64_t new_pages = 0;
  int32_t token_offset = 0;
  for (size_t i = 0; i < n; ++i) {
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
      rows_after_[i] = tail;
      needs_state = true;
    } else if (c.buffer_rows + t > limit) {
      it.fold_first = true;
      rows_after_[i] = t;
      needs_state = true;
    } else {
      rows_after_[i] = c.buffer_rows + t;
    }
    if (needs_state) {
      it.state_is_new = !c.state_valid;
      if (s.state_slot < 0) ++new_states;
    }
    // Pages: the sequence's rows on every layer, with this layer's rows after the call.
    int32_t others = 0;
    for (int32_t l = 0; l < m.num_layers; ++l) {
      if (l != call.layer) others = std::max(others, s.layers[l].buffer_rows + s.layers[l].pending);
    }
    other_rows_[i] = others;
    const int32_t rows = std::max(rows_after_[i], others);
    new_pages += std::max<int64_t>(0, PagesFor(rows) - static_cast<int64_t>(s.pages.size()));
    token_offset += t;
  }
  if (new_states > state_pool_.free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("state pool is full: ", rpc, " needs ", new_states, " new state slots, ",
                     state_pool_.free(), " free of state_slots=", options_.state_slots));
  }
  if (new_pages > page_pool_.free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("buffer page pool is full: ", rpc, " needs ", new_pages, " new pages, ",
                     page_pool_.free(), " free of buffer_pages=", options_.buffer_pages));
  }
  // The outputs land in an output block that the replay records then share.
  const size_t out_row_bytes = static_cast<size_t>(m.out_elems()) * DTypeSize(call.out_dtype);
  const size_t out_bytes = static_cast<size_t>(total_tokens) * out_row_bytes;
  HostBlock* block = TakeBlock(out_bytes);
  if (block == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat(rpc, ": cannot allocate ", out_bytes, " bytes of host memory for outputs"));
  }
  // Allocate (cannot fail now) and build the step.
  fresh_states_.clear();
  pages_before_.resize(n);
  page_table_.clear();
  for (size_t i = 0; i < n; ++i) {
    Sequence& s = *seqs[i];
    StepItem& it = items_[i];
    pages_before_[i] = static_cast<int32_t>(s.pages.size());
    if ((it.fold_first || it.chunked) && s.state_slot < 0) {
      s.state_slot = state_pool_.Take();
      fresh_states_.push_back(&s);
    }
    const LayerCursor& c = s.layers[call.layer];
    it.state_slot = (c.state_valid || it.fold_first || it.chunked) ? s.state_slot : -1;
    // The old rows stay readable during the call.
    const int32_t rows = std::max({rows_after_[i], other_rows_[i], c.buffer_rows});
    while (static_cast<int32_t>(s.pages.size()) < PagesFor(rows)) {
      s.pages.push_back(page_pool_.Take());
    }
    it.page_offset = static_cast<int32_t>(page_table_.size());
    it.num_pages = static_cast<int32_t>(s.pages.size());
    page_table_.insert(page_table_.end(), s.pages.begin(), s.pages.end());
  }
  LayerStep step;
  step.layer = call.layer;
  step.kind = kind;
  step.items = items_;
  step.page_table = page_table_;
  step.in_dtype = call.qkv.dtype;
  step.qkv = inputs[0];
  step.a = inputs[1];
  step.b = inputs[2];
  step.total_tokens = static_cast<int32_t>(total_tokens);
  step.out_dtype = call.out_dtype;
  step.out = block->data;
  if (absl::Status s = backend_->RunLayerStep(step); !s.ok()) {
    // Undo the allocations; the call changed no sequence's bookkeeping.
    for (size_t i = 0; i < n; ++i) {
      while (static_cast<int32_t>(seqs[i]->pages.size()) > pages_before_[i]) {
        page_pool_.Give(seqs[i]->pages.back());
        seqs[i]->pages.pop_back();
      }
    }
    for (Sequence* seq : fresh_states_) {
      state_pool_.Give(seq->state_slot);
      seq->state_slot = -1;
    }
    PutBlock(block);
    return s;
  }
  LayerResult result;
  result.out.dtype = call.out_dtype;
  result.out.shape = {total_tokens, m.num_v_heads, m.head_v_dim};
  result.out.bytes.assign(reinterpret_cast<const char*>(block->data), out_bytes);
  result.positions.reserve(n);
  // Commit the bookkeeping.
  const absl::Time now = now_();
  for (size_t i = 0; i < n; ++i) {
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
      c.buffer_rows = rows_after_[i];
      c.position += it.num_tokens;
    }
    // Only shrinks here: the rows needed are this layer's new rows or another layer's.
    ResizePages(&s, std::max(other_rows_[i], c.buffer_rows + c.pending)).IgnoreError();
    DropReplayOutputs(&s);
    ReplayEntry& r = s.replay;
    r.valid = true;
    r.kind = kind;
    r.layer = call.layer;
    r.position = call.sequences[i].position;
    r.num_tokens = it.num_tokens;
    r.out_dtype = call.out_dtype;
    r.outputs_kept = it.num_tokens <= options_.replay_max_tokens;
    if (r.outputs_kept) {
      r.block = block;
      ++block->refs;
      r.out_offset = static_cast<size_t>(it.token_offset) * out_row_bytes;
      r.out_bytes = static_cast<size_t>(it.num_tokens) * out_row_bytes;
    }
    s.last_used = now;
    result.positions.push_back(c.position);
  }
  if (block->refs == 0) PutBlock(block);  // no sequence keeps its outputs
  return result;
}

absl::Status Engine::CommitDrafts(const std::string& tenant, const std::vector<CommitItem>& items) {
  absl::MutexLock lock(&mu_);
  if (items.empty()) return absl::InvalidArgumentError("items must not be empty");
  const int32_t num_layers = options_.model.num_layers;
  std::vector<Sequence*>& seqs = seqs_;
  seqs.resize(items.size());
  std::vector<uint8_t>& replay = commit_replayed_;  // 1: this commit was applied already
  replay.assign(items.size(), 0);
  const SequenceTable::TenantIds* tenant_ids = table_.Tenant(tenant);
  const uint64_t stamp = ++visit_stamp_;
  for (size_t i = 0; i < items.size(); ++i) {
    const CommitItem& ci = items[i];
    Sequence* s = SequenceTable::Find(tenant_ids, ci.id);
    if (s != nullptr && s->visit == stamp) {
      return absl::InvalidArgumentError(absl::StrCat("items[", i, "].id repeats sequence ", ci.id));
    }
    if (s == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("items[", i, "].id: sequence ", ci.id, " is not open"));
    }
    s->visit = stamp;
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
      replay[i] = 1;  // this commit was applied already
      continue;
    }
    const int32_t drafts = s->layers[0].pending;
    for (int32_t l = 0; l < num_layers; ++l) {
      const LayerCursor& c = s->layers[l];
      if (c.pending == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("items[", i, "]: sequence ", ci.id, " has no drafts pending on layer ", l,
                         " (VerifyDrafts must run on every layer before CommitDrafts)"));
      }
      if (c.pending != drafts) {
        return absl::FailedPreconditionError(
            absl::StrCat("items[", i, "]: sequence ", ci.id, " has ", c.pending,
                         " drafts pending on layer ", l, " but ", drafts, " on layer 0"));
      }
      if (c.position != ci.position) {
        return absl::FailedPreconditionError(
            absl::StrCat("items[", i, "].position is ", ci.position, " but sequence ", ci.id,
                         " is at position ", c.position, " on layer ", l));
      }
    }
    if (ci.accepted > drafts) {
      return absl::OutOfRangeError(absl::StrCat("items[", i, "].accepted is ", ci.accepted,
                                                " but sequence ", ci.id, " has only ", drafts,
                                                " drafts pending"));
    }
  }
  std::vector<ConvCommitItem>& conv = conv_items_;
  conv.clear();
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
    DropReplayOutputs(&s);
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
        return absl::FailedPreconditionError(
            absl::StrCat("sequence ", ids[i], " has ", s->layers[l].pending,
                         " uncommitted drafts on layer ", l, "; call CommitDrafts first"));
      }
      needs_fold = needs_fold || s->layers[l].buffer_rows > 0;
    }
    if (needs_fold && s->state_slot < 0) ++new_states;
    seqs.push_back(s);
  }
  if (new_states > state_pool_.free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("state pool is full: Flush needs ", new_states, " new state slots, ",
                     state_pool_.free(), " free of state_slots=", options_.state_slots));
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
