// kvbuffer-tp-worker: rank > 0 of a tensor-parallel group of one process per GPU. Joins rank 0's
// bootstrap (kvbuffer.v1.TensorParallelBootstrap), joins the NCCL communicator, and serves rank
// 0's commands on its head shard until rank 0 shuts the group down (exit 0) or the group fails
// (exit 1). Example:
//   kvbuffer-tp-worker --leader=kvbuffer-0.kvbuffer:7070 --device=1
#include <unistd.h>

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "service/parallel/bootstrap/bootstrap_service.h"
#include "service/parallel/nccl_group.h"
#include "service/parallel/nccl_transport.h"

#if defined(KVB_TP_HAVE_CUDA_BACKEND)
#include "service/engine/cuda/cuda_backend.h"
#endif

ABSL_FLAG(std::string, leader, "127.0.0.1:7070", "rank 0's bootstrap address (host:port)");
ABSL_FLAG(int, device, 0, "GPU this rank uses");
ABSL_FLAG(int, rank, 0, "rank to ask for (0: any free rank)");
ABSL_FLAG(std::string, worker_id, "", "stable name of this worker (default: hostname/gpuN)");
ABSL_FLAG(int, join_timeout_s, 300, "how long to keep trying to reach rank 0");

namespace {

std::unique_ptr<kvbuffer::Backend> MakeShard(const std::string& kind, int device) {
  if (kind == "cpu") return kvbuffer::MakeCpuBackend();
#if defined(KVB_TP_HAVE_CUDA_BACKEND)
  if (kind == "cuda") return kvbuffer::MakeCudaBackend(device);
#endif
  (void)device;
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Rank > 0 of a KVBuffer tensor-parallel group (one process per GPU).");
  absl::ParseCommandLine(argc, argv);
  kvbuffer::parallel::KeepNvlinkMulticastOff();
  const int device = absl::GetFlag(FLAGS_device);
  std::string worker_id = absl::GetFlag(FLAGS_worker_id);
  if (worker_id.empty()) {
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    worker_id = absl::StrCat(host, "/gpu", device);
  }
  kvbuffer::parallel::TpJoinRequest request;
  request.worker_id = worker_id;
  request.requested_rank = absl::GetFlag(FLAGS_rank);
  request.device = device;
  absl::StatusOr<kvbuffer::parallel::TpJoinGrant> grant = kvbuffer::parallel::JoinTpGroup(
      absl::GetFlag(FLAGS_leader), request, absl::Seconds(absl::GetFlag(FLAGS_join_timeout_s)));
  if (!grant.ok()) {
    std::fprintf(stderr, "kvbuffer-tp-worker: %s\n", grant.status().ToString().c_str());
    return 1;
  }
  const kvbuffer::parallel::TpGroupPlan& plan = grant->plan;
  std::fprintf(stderr,
               "kvbuffer-tp-worker %s: rank %d of %d on GPU %d, model %s (H=%d HV=%d), shard "
               "backend %s, NCCL %s\n",
               worker_id.c_str(), grant->rank, plan.world_size, device, plan.model.name.c_str(),
               plan.model.num_k_heads, plan.model.num_v_heads, plan.shard_backend.c_str(),
               kvbuffer::parallel::NcclVersionString().c_str());
  kvbuffer::parallel::NcclGroupOptions options;
  options.tp = plan.protocol;
  options.init_timeout = plan.init_timeout;
  const std::string kind = plan.shard_backend;
  options.make_backend = [kind](int32_t, int dev) { return MakeShard(kind, dev); };
#if defined(KVB_TP_HAVE_CUDA_BACKEND) && defined(KVB_CUDA_BACKEND_DEVICE_STEP)
  if (kind == "cuda") {
    options.device_step = [](kvbuffer::Backend& b, const kvbuffer::LayerStep& step, void* stream) {
      return kvbuffer::RunLayerStepOnDevice(b, step, stream);
    };
  }
#endif
  absl::Status s = kvbuffer::parallel::RunNcclGroupWorker(plan.nccl_unique_id, grant->rank,
                                                          plan.world_size, device, options);
  if (!s.ok()) {
    std::fprintf(stderr, "kvbuffer-tp-worker: rank %d: %s\n", grant->rank, s.ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "kvbuffer-tp-worker: rank %d: shut down by rank 0\n", grant->rank);
  return 0;
}
