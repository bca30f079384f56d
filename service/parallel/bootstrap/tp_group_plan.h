// What rank 0 hands every other rank of a one-process-per-GPU group when it joins (the payload of
// kvbuffer.v1.TensorParallelBootstrap.Join, without gRPC types), and the conversions to and from
// the protobuf messages.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kernels/reference/model_config.h"
#include "service/engine/backend.h"
#include "service/engine/engine_options.h"
#include "service/parallel/tp_options.h"

namespace kvbuffer::parallel {

// Everything the ranks of a group share.
struct TpGroupPlan {
  std::string nccl_unique_id;  // from NewNcclUniqueId on rank 0
  int32_t world_size = 2;
  ModelConfig model;   // the full model; each rank derives its head shard
  PoolSizes pools;     // for logs and early checks; the allocate command carries them again
  TpOptions protocol;  // command_bytes and deadlines (on_broken stays on rank 0)
  absl::Duration init_timeout = absl::Minutes(2);
  std::string shard_backend = "cuda";  // what every rank runs its shard on: "cuda" or "cpu"
};

// A worker's request to join.
struct TpJoinRequest {
  std::string worker_id;       // stable name: pod or host and GPU
  int32_t requested_rank = 0;  // 0: any free rank
  int32_t device = 0;
  int64_t device_memory_bytes = 0;
};

// The answer: the worker's rank and the plan.
struct TpJoinGrant {
  int32_t rank = 0;
  TpGroupPlan plan;
};

// The pool sizes an engine with `options` allocates (as Engine::Create computes them).
PoolSizes PoolSizesOf(const EngineOptions& options);

}  // namespace kvbuffer::parallel
