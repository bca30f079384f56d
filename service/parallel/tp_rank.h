// RankExecutor: runs one command's local part on a rank's shard (the same code on rank 0 and on
// the workers): a step on inputs in transport memory, or a fold, conv commit, conv reset or state
// read on the shard's backend, writing any output payload into transport memory.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "service/parallel/shard_compute.h"
#include "service/parallel/tp_buffers.h"
#include "service/parallel/tp_options.h"
#include "service/parallel/tp_protocol.h"
#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

// The metadata of one command as spans (leader: the caller's; workers: decoded).
struct MetaView {
  std::span<const StepItem> step_items;
  std::span<const FoldItem> fold_items;
  std::span<const ConvCommitItem> conv_items;
  std::span<const int32_t> ints;  // page table, or conv slots for kResetConv
};

// Spans over decoded metadata.
inline MetaView View(const DecodedMeta& m) {
  return {m.step_items, m.fold_items, m.conv_items, m.ints};
}

class RankExecutor {
 public:
  // Borrows the rank's transport and shard compute.
  RankExecutor(TpTransport* transport, ShardCompute* compute, const TpOptions* options)
      : transport_(transport), compute_(compute), options_(options) {}

  // Allocates the shard (its config is derived from the full `config` and this rank).
  absl::Status Allocate(const ModelConfig& config, const std::vector<LayerParams>& shard_params,
                        const PoolSizes& sizes);

  // Runs `h` (not kAllocate or kShutdown) with inputs at `inputs` and the output payload at
  // `payload` (transport memory, h.output_bytes); the payload is complete once the transport
  // syncs.
  absl::Status RunLocal(const CommandHeader& h, const MetaView& meta, const void* inputs,
                        void* payload);

  // The shard's config (after Allocate).
  const ModelConfig& shard() const { return shard_; }

 private:
  TpTransport* transport_;
  ShardCompute* compute_;
  const TpOptions* options_;
  ModelConfig shard_;
  TransportBuffer state_host_{/*host=*/true};
};

}  // namespace kvbuffer::parallel
