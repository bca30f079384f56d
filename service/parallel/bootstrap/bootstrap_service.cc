#include "service/parallel/bootstrap/bootstrap_service.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "service/parallel/tp_protocol.h"
#include "service/server/status_conversion.h"

namespace kvbuffer::parallel {
namespace {

absl::StatusOr<DType> ParseDType(const std::string& s) {
  if (s == "FP32") return DType::kFloat32;
  if (s == "FP16") return DType::kFloat16;
  if (s == "BF16") return DType::kBFloat16;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", s, "\""));
}

absl::Duration Ms(int64_t ms) { return absl::Milliseconds(ms); }
int64_t ToMs(absl::Duration d) { return absl::ToInt64Milliseconds(d); }

}  // namespace

void ToProto(const TpGroupPlan& plan, int32_t rank, kvbuffer::v1::JoinResponse* out) {
  out->set_nccl_unique_id(plan.nccl_unique_id);
  out->set_rank(rank);
  out->set_world_size(plan.world_size);
  kvbuffer::v1::TpModel* m = out->mutable_model();
  m->set_name(plan.model.name);
  m->set_num_layers(plan.model.num_layers);
  m->set_num_k_heads(plan.model.num_k_heads);
  m->set_num_v_heads(plan.model.num_v_heads);
  m->set_head_k_dim(plan.model.head_k_dim);
  m->set_head_v_dim(plan.model.head_v_dim);
  m->set_conv_width(plan.model.conv_width);
  m->set_param_seed(plan.model.param_seed);
  kvbuffer::v1::TpPools* p = out->mutable_pools();
  p->set_state_slots(plan.pools.state_slots);
  p->set_buffer_pages(plan.pools.buffer_pages);
  p->set_page_tokens(plan.pools.page_tokens);
  p->set_conv_slots(plan.pools.conv_slots);
  p->set_max_drafts(plan.pools.max_drafts);
  p->set_buffer_dtype(DTypeName(plan.pools.buffer_dtype));
  p->set_conv_dtype(DTypeName(plan.pools.conv_dtype));
  kvbuffer::v1::TpProtocol* t = out->mutable_protocol();
  t->set_command_bytes(plan.protocol.command_bytes);
  t->set_op_timeout_ms(ToMs(plan.protocol.op_timeout));
  t->set_idle_timeout_ms(ToMs(plan.protocol.idle_timeout));
  t->set_heartbeat_interval_ms(ToMs(plan.protocol.heartbeat_interval));
  t->set_init_timeout_ms(ToMs(plan.init_timeout));
  out->set_shard_backend(plan.shard_backend);
}

absl::StatusOr<TpJoinGrant> FromProto(const kvbuffer::v1::JoinResponse& r) {
  TpJoinGrant g;
  g.rank = r.rank();
  TpGroupPlan& plan = g.plan;
  plan.nccl_unique_id = r.nccl_unique_id();
  plan.world_size = r.world_size();
  plan.model.name = r.model().name();
  plan.model.num_layers = r.model().num_layers();
  plan.model.num_k_heads = r.model().num_k_heads();
  plan.model.num_v_heads = r.model().num_v_heads();
  plan.model.head_k_dim = r.model().head_k_dim();
  plan.model.head_v_dim = r.model().head_v_dim();
  plan.model.conv_width = r.model().conv_width();
  plan.model.param_seed = r.model().param_seed();
  plan.pools.state_slots = r.pools().state_slots();
  plan.pools.buffer_pages = r.pools().buffer_pages();
  plan.pools.page_tokens = r.pools().page_tokens();
  plan.pools.conv_slots = r.pools().conv_slots();
  plan.pools.max_drafts = r.pools().max_drafts();
  absl::StatusOr<DType> bd = ParseDType(r.pools().buffer_dtype());
  if (!bd.ok()) return bd.status();
  absl::StatusOr<DType> cd = ParseDType(r.pools().conv_dtype());
  if (!cd.ok()) return cd.status();
  plan.pools.buffer_dtype = *bd;
  plan.pools.conv_dtype = *cd;
  plan.protocol.command_bytes = r.protocol().command_bytes();
  plan.protocol.op_timeout = Ms(r.protocol().op_timeout_ms());
  plan.protocol.idle_timeout = Ms(r.protocol().idle_timeout_ms());
  plan.protocol.heartbeat_interval = Ms(r.protocol().heartbeat_interval_ms());
  plan.init_timeout = Ms(r.protocol().init_timeout_ms());
  plan.shard_backend = r.shard_backend();
  if (g.rank < 1 || g.rank >= plan.world_size) {
    return absl::InternalError(
        absl::StrCat("bootstrap granted rank ", g.rank, " of ", plan.world_size));
  }
  return g;
}

TpJoinRequest FromProto(const kvbuffer::v1::JoinRequest& r) {
  TpJoinRequest q;
  q.worker_id = r.worker_id();
  q.requested_rank = r.requested_rank();
  q.device = r.device();
  q.device_memory_bytes = r.device_memory_bytes();
  return q;
}

TpBootstrapService::TpBootstrapService(TpGroupPlan plan)
    : plan_(std::move(plan)), members_(std::max(plan_.world_size, 1)) {
  members_[0] = "rank 0";
}

absl::StatusOr<int32_t> TpBootstrapService::Assign(const TpJoinRequest& request) {
  if (request.worker_id.empty()) return absl::InvalidArgumentError("worker_id is empty");
  absl::MutexLock lock(&mu_);
  // A retried Join (same worker) gets its rank again.
  for (int32_t r = 1; r < plan_.world_size; ++r) {
    if (members_[r] == request.worker_id) return r;
  }
  if (request.requested_rank != 0) {
    const int32_t r = request.requested_rank;
    if (r < 1 || r >= plan_.world_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("requested rank ", r, " outside [1, ", plan_.world_size, ")"));
    }
    if (!members_[r].empty()) {
      return absl::AlreadyExistsError(
          absl::StrCat("rank ", r, " is taken by \"", members_[r], "\""));
    }
    members_[r] = request.worker_id;
    return r;
  }
  for (int32_t r = 1; r < plan_.world_size; ++r) {
    if (members_[r].empty()) {
      members_[r] = request.worker_id;
      return r;
    }
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", plan_.world_size - 1, " worker ranks are taken"));
}

grpc::ServerUnaryReactor* TpBootstrapService::Join(grpc::CallbackServerContext* context,
                                                   const kvbuffer::v1::JoinRequest* request,
                                                   kvbuffer::v1::JoinResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->protocol_layout() != kTpLayout) {
    reactor->Finish(server::ToGrpcStatus(absl::FailedPreconditionError(
        absl::StrCat("worker protocol layout ", request->protocol_layout(),
                     " differs from rank 0's ", kTpLayout, ": run the same build on every rank"))));
    return reactor;
  }
  absl::StatusOr<int32_t> rank = Assign(FromProto(*request));
  if (!rank.ok()) {
    reactor->Finish(server::ToGrpcStatus(rank.status()));
    return reactor;
  }
  ToProto(plan_, *rank, response);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

absl::Status TpBootstrapService::WaitForAllRanks(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto all = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return std::none_of(members_.begin(), members_.end(),
                        [](const std::string& m) { return m.empty(); });
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&all), timeout)) {
    int32_t joined = 0;
    for (const std::string& m : members_) joined += m.empty() ? 0 : 1;
    return absl::DeadlineExceededError(absl::StrCat(
        joined, " of ", plan_.world_size, " ranks joined within ", absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

std::vector<std::string> TpBootstrapService::Members() {
  absl::MutexLock lock(&mu_);
  return members_;
}

absl::StatusOr<std::unique_ptr<BootstrapServer>> BootstrapServer::Start(const std::string& address,
                                                                        TpGroupPlan plan) {
  std::unique_ptr<BootstrapServer> s(new BootstrapServer());
  s->service_ = std::make_unique<TpBootstrapService>(std::move(plan));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &s->port_);
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve the bootstrap on ", address));
  }
  return s;
}

BootstrapServer::~BootstrapServer() {
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
}

absl::StatusOr<TpJoinGrant> JoinTpGroup(const std::string& target, const TpJoinRequest& request,
                                        absl::Duration timeout) {
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = kvbuffer::v1::TensorParallelBootstrap::NewStub(channel);
  kvbuffer::v1::JoinRequest req;
  req.set_worker_id(request.worker_id);
  req.set_requested_rank(request.requested_rank);
  req.set_device(request.device);
  req.set_protocol_layout(kTpLayout);
  req.set_device_memory_bytes(request.device_memory_bytes);
  const absl::Time deadline = absl::Now() + timeout;
  absl::Duration backoff = absl::Milliseconds(100);
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(10))));
    ctx.set_wait_for_ready(true);  // rank 0 may not be listening yet
    kvbuffer::v1::JoinResponse resp;
    grpc::Status s = stub->Join(&ctx, req, &resp);
    if (s.ok()) return FromProto(resp);
    const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!retry || absl::Now() + backoff > deadline) {
      return absl::Status(
          static_cast<absl::StatusCode>(s.error_code()),
          absl::StrCat("joining the tensor-parallel group at ", target, ": ", s.error_message()));
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
}

}  // namespace kvbuffer::parallel
