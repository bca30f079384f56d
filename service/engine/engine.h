// The engine: sequences, their per-layer cursors, pools and admission, in front of a Backend.
// Every call is all-or-nothing: it validates and reserves everything before the backend runs, and
// a failed call leaves every sequence as it was. Thread-safe (one lock; calls are serialised).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/engine/activation_check.h"
#include "service/engine/backend.h"
#include "service/engine/capacity.h"
#include "service/engine/engine_options.h"
#include "service/engine/sequence_table.h"
#include "service/engine/slot_pool.h"
#include "service/engine/tensor.h"

namespace kvbuffer {

// One sequence's part of a per-layer call: its id, the position the caller expects it to be at
// on this layer (committed tokens), and how many tokens it brings.
struct SequenceTokens {
  uint64_t id = 0;
  int64_t position = 0;
  int32_t num_tokens = 1;
};

// A per-layer call (Prefill, DecodeStep or VerifyDrafts). qkv is [total_tokens, channels],
// a and b [total_tokens, HV], tokens of the sequences concatenated in order.
struct LayerCall {
  std::string tenant;  // namespace of the ids ("" when auth is off)
  int32_t layer = 0;
  std::vector<SequenceTokens> sequences;
  TensorView qkv;
  TensorView a;
  TensorView b;
  DType out_dtype = DType::kFloat32;
};

// Outputs of a per-layer call: out is [total_tokens, HV, V].
struct LayerResult {
  Tensor out;
  bool replayed = false;           // the call had been applied already; outputs are the same
  std::vector<int64_t> positions;  // each sequence's committed position on the layer after
};

// Accepted prefix of one sequence's pending drafts.
struct CommitItem {
  uint64_t id = 0;
  int64_t position = 0;  // committed position at which the drafts were verified
  int32_t accepted = 0;  // 0..drafts
};

// Where one sequence stands (for tests, operators and the Stream session).
struct SequenceInfo {
  uint64_t id = 0;
  std::vector<int64_t> positions;  // committed tokens per layer
  int32_t pending_drafts = 0;      // tentative rows on layers that verified
  bool has_state = false;
  int32_t buffer_pages = 0;
  int64_t bytes = 0;  // pool bytes this sequence holds
};

// The key of one open sequence: its tenant's namespace and its client-chosen id.
struct SequenceKey {
  std::string tenant;
  uint64_t id = 0;
};

// The activation value rule (kActivationMagnitudeLog2) is in activation_check.h.

// Everything GetServerInfo reports.
struct EngineInfo {
  EngineOptions options;
  std::string backend;
  PoolElementBytes element_bytes;
  int32_t open_sequences = 0;
  int32_t free_conv_slots = 0;
  int32_t free_state_slots = 0;
  int32_t free_buffer_pages = 0;
  BackendMemory memory;
  int64_t flushes = 0;          // folds done (per sequence and layer)
  int64_t drafts_verified = 0;  // tentative tokens computed
  int64_t drafts_accepted = 0;
};

class Engine {
 public:
  // Validates `options`, allocates the backend's pools and returns a ready engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(EngineOptions options,
                                                        std::unique_ptr<Backend> backend);
  ~Engine();

  // Opens sequences with client-chosen ids (ALREADY_EXISTS if one is open; RESOURCE_EXHAUSTED if
  // the sequence table is full). All or none are opened.
  absl::Status Open(const std::string& tenant, const std::vector<uint64_t>& ids);

  // Closes sequences and frees everything they hold (NOT_FOUND if one is unknown; none closed).
  absl::Status Close(const std::string& tenant, const std::vector<uint64_t>& ids);

  // Prefill: num_tokens >= 1 committed tokens per sequence on call.layer.
  absl::StatusOr<LayerResult> Prefill(const LayerCall& call);

  // DecodeStep: exactly one committed token per sequence on call.layer.
  absl::StatusOr<LayerResult> DecodeStep(const LayerCall& call);

  // VerifyDrafts: 1..max_drafts tentative tokens per sequence on call.layer.
  absl::StatusOr<LayerResult> VerifyDrafts(const LayerCall& call);

  // Keeps the first `accepted` drafts of each sequence on every layer, drops the rest.
  absl::Status CommitDrafts(const std::string& tenant, const std::vector<CommitItem>& items);

  // Folds buffers into states now on every layer (allocating states where needed).
  absl::Status Flush(const std::string& tenant, const std::vector<uint64_t>& ids);

  // Where a sequence stands (NOT_FOUND if unknown).
  absl::StatusOr<SequenceInfo> Describe(const std::string& tenant, uint64_t id);

  // Every open sequence of every tenant, ordered by (tenant, id) (for draining and operators).
  std::vector<SequenceKey> ListSequences();

  // Pools, counters and settings.
  EngineInfo Info();

  // Open sequences of one tenant.
  int32_t OpenSequencesOf(const std::string& tenant);

  // Memory per sequence and sequences that fit, at `length` tokens with `drafts` per step.
  CapacityEstimate EstimateCapacity(int64_t length, int32_t drafts);

  // Closes sequences idle since before now - idle_ttl; returns how many.
  int32_t ReclaimIdle(absl::Time now);

  // Clock used for idle tracking (tests replace it).
  void SetClockForTesting(absl::Time (*now)());

  const EngineOptions& options() const { return options_; }

 private:
  Engine(EngineOptions options, std::unique_ptr<Backend> backend);

  absl::StatusOr<LayerResult> RunLayer(const LayerCall& call, StepKind kind);
  // Checks the activations' dtypes, shapes and values. When the backend prefers its host memory
  // for inputs, copies them into a staging block while checking (*stage, to be given back with
  // PutInputStage); inputs[] receives where the backend should read qkv, a and b.
  absl::Status ValidateActivations(const LayerCall& call, int64_t total_tokens, HostBlock** stage,
                                   const void* inputs[3]);
  absl::StatusOr<LayerResult> Replay(const LayerCall& call, std::span<Sequence* const> seqs);
  absl::Status ResizePages(Sequence* seq, int32_t rows) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Release(Sequence* seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int32_t PagesFor(int32_t rows) const;
  // An output block of at least `bytes` bytes with no references, from the pool or new; nullptr
  // when memory cannot be had.
  HostBlock* TakeBlock(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops one reference (or, at refs == 0, the taker's claim) of `block`; an unreferenced block
  // goes back to the pool or is freed.
  void PutBlock(HostBlock* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeBlock(HostBlock* block);
  // A new block of at least `bytes` bytes (backend memory when it offers some); nullptr when
  // memory cannot be had.
  HostBlock* NewBlock(size_t bytes);
  // An input staging block of at least `bytes` bytes (nullptr: stage nothing), and its return.
  HostBlock* TakeInputStage(size_t bytes) ABSL_LOCKS_EXCLUDED(stage_mu_);
  void PutInputStage(HostBlock* block) ABSL_LOCKS_EXCLUDED(stage_mu_);
  // Forgets a sequence's replay outputs (one reference of their block).
  void DropReplayOutputs(Sequence* seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  PoolElementBytes element_bytes_;
  absl::Mutex mu_;
  SequenceTable table_ ABSL_GUARDED_BY(mu_);
  SlotPool conv_pool_ ABSL_GUARDED_BY(mu_);
  SlotPool state_pool_ ABSL_GUARDED_BY(mu_);
  SlotPool page_pool_ ABSL_GUARDED_BY(mu_);
  int64_t flushes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t drafts_verified_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t drafts_accepted_ ABSL_GUARDED_BY(mu_) = 0;
  // Scratch reused across calls (no allocation on the per-step path once warm).
  std::vector<StepItem> items_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> page_table_ ABSL_GUARDED_BY(mu_);
  std::vector<Sequence*> seqs_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> rows_after_ ABSL_GUARDED_BY(mu_);  // this layer's rows after the call
  std::vector<int32_t> other_rows_ ABSL_GUARDED_BY(mu_);  // most rows of any other layer
  std::vector<int32_t> pages_before_ ABSL_GUARDED_BY(mu_);
  std::vector<Sequence*> fresh_states_ ABSL_GUARDED_BY(mu_);
  std::vector<ConvCommitItem> conv_items_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> commit_replayed_ ABSL_GUARDED_BY(mu_);
  uint64_t visit_stamp_ ABSL_GUARDED_BY(mu_) = 0;  // Sequence::visit of the current call
  // Unreferenced output blocks kept for reuse (see TakeBlock).
  std::vector<HostBlock*> free_blocks_ ABSL_GUARDED_BY(mu_);
  // Input staging (backends that prefer their host memory for activations): one block per call
  // in flight, taken before mu_ so that checks of concurrent calls still overlap.
  bool stage_inputs_ = false;
  bool check_values_ = true;  // false when the backend checks activation values itself
  absl::Mutex stage_mu_;
  std::vector<HostBlock*> free_stages_ ABSL_GUARDED_BY(stage_mu_);
  absl::Time (*now_)() = &absl::Now;
};

}  // namespace kvbuffer
