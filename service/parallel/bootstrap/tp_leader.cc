#include "service/parallel/bootstrap/tp_leader.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "service/parallel/head_shard.h"
#include "service/parallel/nccl_transport.h"

namespace kvbuffer::parallel {

absl::StatusOr<std::unique_ptr<TpLeader>> TpLeader::Start(TpLeaderOptions options) {
  if (absl::Status s = ValidateShardCount(options.engine.model, options.world_size); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> id = NewNcclUniqueId();
  if (!id.ok()) return id.status();
  TpGroupPlan plan;
  plan.nccl_unique_id = *id;
  plan.world_size = options.world_size;
  plan.model = options.engine.model;
  plan.pools = PoolSizesOf(options.engine);
  plan.protocol = options.group.tp;
  plan.protocol.on_broken = nullptr;
  plan.init_timeout = options.group.init_timeout;
  plan.shard_backend = options.shard_backend;
  std::unique_ptr<TpLeader> leader(new TpLeader());
  absl::StatusOr<std::unique_ptr<BootstrapServer>> bootstrap =
      BootstrapServer::Start(options.bootstrap_address, std::move(plan));
  if (!bootstrap.ok()) return bootstrap.status();
  leader->bootstrap_ = *std::move(bootstrap);
  absl::StatusOr<std::unique_ptr<TpBackend>> backend =
      MakeNcclGroupLeader(*id, options.world_size, options.device, std::move(options.group));
  if (!backend.ok()) {
    return absl::Status(backend.status().code(),
                        absl::StrCat(backend.status().message(), "; ranks joined: ",
                                     leader->bootstrap_->service().Members().size()));
  }
  leader->backend_ = *std::move(backend);
  return leader;
}

}  // namespace kvbuffer::parallel
