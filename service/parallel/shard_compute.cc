#include "service/parallel/shard_compute.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "service/parallel/tp_buffers.h"
#include "service/parallel/tp_protocol.h"

namespace kvbuffer::parallel {
namespace {

class InPlaceShardCompute : public ShardCompute {
 public:
  explicit InPlaceShardCompute(std::unique_ptr<Backend> backend) : backend_(std::move(backend)) {}

  Backend& backend() override { return *backend_; }

  absl::Status Allocate(const ModelConfig& shard, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override {
    return backend_->Allocate(shard, params, sizes);
  }

  absl::Status RunStepInTransport(const LayerStep& step, TpTransport& transport,
                                  absl::Duration timeout) override {
    if (!transport.host_accessible()) {
      return absl::FailedPreconditionError(
          "an in-place shard needs host-accessible transport memory; use a staged shard");
    }
    if (absl::Status s = transport.Sync(timeout); !s.ok()) return s;
    return backend_->RunLayerStep(step);
  }

 private:
  std::unique_ptr<Backend> backend_;
};

class StagedShardCompute : public ShardCompute {
 public:
  explicit StagedShardCompute(std::unique_ptr<Backend> backend) : backend_(std::move(backend)) {}

  Backend& backend() override { return *backend_; }

  absl::Status Allocate(const ModelConfig& shard, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override {
    shard_ = shard;
    return backend_->Allocate(shard, params, sizes);
  }

  absl::Status RunStepInTransport(const LayerStep& step, TpTransport& transport,
                                  absl::Duration timeout) override {
    if (step.items.empty() || step.total_tokens <= 0) {
      return backend_->RunLayerStep(step);
    }
    const StepInputLayout in = ComputeStepInputLayout(shard_, step.total_tokens, step.in_dtype);
    const size_t out_bytes = StepOutputBytes(shard_, step.total_tokens, step.out_dtype);
    absl::StatusOr<void*> in_buf = in_.Reserve(transport, in.total);
    if (!in_buf.ok()) return in_buf.status();
    absl::StatusOr<void*> out_buf = out_.Reserve(transport, out_bytes);
    if (!out_buf.ok()) return out_buf.status();
    uint8_t* host_in = static_cast<uint8_t*>(*in_buf);
    void* host_out = *out_buf;
    const size_t T = static_cast<size_t>(step.total_tokens);
    const size_t es = DTypeSize(step.in_dtype);
    absl::Status s = transport.CopyOut(host_in + in.qkv, step.qkv, T * shard_.channels() * es);
    if (s.ok()) s = transport.CopyOut(host_in + in.a, step.a, T * shard_.num_v_heads * es);
    if (s.ok()) s = transport.CopyOut(host_in + in.b, step.b, T * shard_.num_v_heads * es);
    if (s.ok()) s = transport.Sync(timeout);
    if (!s.ok()) return s;
    LayerStep host = step;
    host.qkv = host_in + in.qkv;
    host.a = host_in + in.a;
    host.b = host_in + in.b;
    host.out = host_out;
    if (absl::Status r = backend_->RunLayerStep(host); !r.ok()) return r;
    return transport.CopyIn(step.out, host_out, T * shard_.out_elems() * DTypeSize(step.out_dtype));
  }

 private:
  std::unique_ptr<Backend> backend_;
  ModelConfig shard_;
  TransportBuffer in_{/*host=*/true}, out_{/*host=*/true};
};

class DeviceShardCompute : public ShardCompute {
 public:
  DeviceShardCompute(std::unique_ptr<Backend> backend, DeviceStepFn device_step)
      : staged_(std::move(backend)), device_step_(std::move(device_step)) {}

  Backend& backend() override { return staged_.backend(); }

  absl::Status Allocate(const ModelConfig& shard, const std::vector<LayerParams>& params,
                        const PoolSizes& sizes) override {
    return staged_.Allocate(shard, params, sizes);
  }

  absl::Status RunStepInTransport(const LayerStep& step, TpTransport& transport,
                                  absl::Duration timeout) override {
    if (device_step_) {
      absl::Status s = device_step_(staged_.backend(), step, transport.stream());
      if (s.code() != absl::StatusCode::kUnimplemented) return s;
      device_step_ = nullptr;  // this backend has no device entry point: stage from now on
    }
    return staged_.RunStepInTransport(step, transport, timeout);
  }

 private:
  StagedShardCompute staged_;
  DeviceStepFn device_step_;
};

}  // namespace

std::unique_ptr<ShardCompute> MakeDeviceShardCompute(std::unique_ptr<Backend> backend,
                                                     DeviceStepFn device_step) {
  return std::make_unique<DeviceShardCompute>(std::move(backend), std::move(device_step));
}

std::unique_ptr<ShardCompute> MakeInPlaceShardCompute(std::unique_ptr<Backend> backend) {
  return std::make_unique<InPlaceShardCompute>(std::move(backend));
}

std::unique_ptr<ShardCompute> MakeStagedShardCompute(std::unique_ptr<Backend> backend) {
  return std::make_unique<StagedShardCompute>(std::move(backend));
}

}  // namespace kvbuffer::parallel
