// Rank 0 of a one-process-per-GPU group, in one call: makes the NCCL unique id, serves the gRPC
// bootstrap so that the other ranks can join, joins the communicator itself (waiting for all),
// and yields the TpBackend to hand to Engine::Create. For the server's main.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "service/engine/engine_options.h"
#include "service/parallel/bootstrap/bootstrap_service.h"
#include "service/parallel/nccl_group.h"
#include "service/parallel/tp_backend.h"

namespace kvbuffer::parallel {

struct TpLeaderOptions {
  std::string bootstrap_address = "0.0.0.0:0";  // where the workers' Join goes
  int32_t world_size = 2;
  int device = 0;                      // rank 0's GPU
  EngineOptions engine;                // the model and pools the engine will allocate
  std::string shard_backend = "cuda";  // "cuda" or "cpu", on every rank
  NcclGroupOptions group;              // protocol settings, rank 0's backend factory, device step
};

class TpLeader {
 public:
  // Serves the bootstrap and joins the group as rank 0; returns once every rank has joined the
  // communicator (UNAVAILABLE after group.init_timeout).
  static absl::StatusOr<std::unique_ptr<TpLeader>> Start(TpLeaderOptions options);

  // The group's backend (once; the caller hands it to Engine::Create).
  std::unique_ptr<TpBackend> TakeBackend() { return std::move(backend_); }

  // The bootstrap's port (answers retried Joins while the group lives).
  int bootstrap_port() const { return bootstrap_->port(); }

 private:
  TpLeader() = default;
  std::unique_ptr<BootstrapServer> bootstrap_;
  std::unique_ptr<TpBackend> backend_;
};

}  // namespace kvbuffer::parallel
