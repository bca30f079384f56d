// The gRPC side of the tensor-parallel bootstrap (kvbuffer.v1.TensorParallelBootstrap): rank 0's
// service that hands out ranks and the group plan, a standalone server for it, and the worker's
// Join call. The only place of service/parallel that knows gRPC; separable from the rest.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvbuffer/v1/bootstrap.grpc.pb.h"
#include "service/parallel/bootstrap/tp_group_plan.h"

namespace grpc {
class Server;
}

namespace kvbuffer::parallel {

// Rank 0's Join handler. Register it on the server's builder (beside AttentionService) or use
// StartBootstrapServer.
class TpBootstrapService final : public kvbuffer::v1::TensorParallelBootstrap::CallbackService {
 public:
  // Serves `plan` (its nccl_unique_id and world_size must be set).
  explicit TpBootstrapService(TpGroupPlan plan);

  // Assigns a rank (see bootstrap.proto for the rules).
  grpc::ServerUnaryReactor* Join(grpc::CallbackServerContext* context,
                                 const kvbuffer::v1::JoinRequest* request,
                                 kvbuffer::v1::JoinResponse* response) override;

  // Waits until every rank > 0 has been handed out (DEADLINE_EXCEEDED after `timeout`).
  absl::Status WaitForAllRanks(absl::Duration timeout);

  // Workers that joined, by rank (empty string: rank not taken yet); index 0 is rank 0.
  std::vector<std::string> Members();

 private:
  absl::StatusOr<int32_t> Assign(const TpJoinRequest& request);

  const TpGroupPlan plan_;
  absl::Mutex mu_;
  std::vector<std::string> members_ ABSL_GUARDED_BY(mu_);
};

// A gRPC server carrying only the bootstrap service.
class BootstrapServer {
 public:
  // Listens on `address` ("host:port"; port 0 picks one) and serves `plan`.
  static absl::StatusOr<std::unique_ptr<BootstrapServer>> Start(const std::string& address,
                                                                TpGroupPlan plan);
  // Stops serving.
  ~BootstrapServer();

  // The port it listens on.
  int port() const { return port_; }
  // The service (to wait for the ranks).
  TpBootstrapService& service() { return *service_; }

 private:
  BootstrapServer() = default;
  std::unique_ptr<TpBootstrapService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// Writes `plan` and the granted `rank` into a Join answer.
void ToProto(const TpGroupPlan& plan, int32_t rank, kvbuffer::v1::JoinResponse* out);
// Reads a Join answer (INVALID_ARGUMENT on an unknown dtype, INTERNAL on an impossible rank).
absl::StatusOr<TpJoinGrant> FromProto(const kvbuffer::v1::JoinResponse& response);
// Reads a Join request.
TpJoinRequest FromProto(const kvbuffer::v1::JoinRequest& request);

// Worker side: joins the group at `target` (rank 0's bootstrap address), retrying while rank 0 is
// not up yet, until `timeout`.
absl::StatusOr<TpJoinGrant> JoinTpGroup(const std::string& target, const TpJoinRequest& request,
                                        absl::Duration timeout);

}  // namespace kvbuffer::parallel
