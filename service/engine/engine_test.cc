// The engine's typed suite on the exact CPU backend, and on the same backend offering host buffers
// (so that the engine stages activations and keeps outputs in backend memory, as with a GPU).
#include <cstdint>
#include <cstdlib>
#include <span>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "service/engine/engine_test_suite.h"

namespace kvbuffer::testing {
namespace {

std::unique_ptr<Backend> MakeCpu() { return MakeCpuBackend(); }

// CpuBackend behind AllocateHostBuffer/PrefersHostBufferInputs: every step must read its
// activations from, and write its outputs to, memory this backend handed out.
class HostBufferCpuBackend : public Backend {
 public:
  HostBufferCpuBackend() : inner_(MakeCpuBackend()) {}
  ~HostBufferCpuBackend() override { EXPECT_TRUE(buffers_.empty()) << "host buffers leaked"; }

  std::string Name() const override { return inner_->Name(); }
  absl::Status Allocate(const ModelConfig& c, const std::vector<LayerParams>& p,
                        const PoolSizes& s) override {
    return inner_->Allocate(c, p, s);
  }
  absl::Status RunLayerStep(const LayerStep& step) override {
    if (!step.items.empty()) {
      EXPECT_TRUE(Owned(step.qkv) && Owned(step.a) && Owned(step.b) && Owned(step.out));
    }
    return inner_->RunLayerStep(step);
  }
  absl::Status FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                           std::span<const int32_t> page_table) override {
    return inner_->FoldBuffers(layer, items, page_table);
  }
  absl::Status CommitConv(int32_t layer, std::span<const ConvCommitItem> items) override {
    return inner_->CommitConv(layer, items);
  }
  absl::Status ResetConv(std::span<const int32_t> slots) override {
    return inner_->ResetConv(slots);
  }
  absl::Status ReadState(int32_t slot, int32_t layer, float* out) override {
    return inner_->ReadState(slot, layer, out);
  }
  BackendMemory Memory() const override { return inner_->Memory(); }
  void* AllocateHostBuffer(size_t bytes) override {
    void* p = std::malloc(bytes);
    absl::MutexLock lock(&mu_);
    buffers_.push_back({static_cast<uint8_t*>(p), bytes});
    return p;
  }
  void FreeHostBuffer(void* p) override {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < buffers_.size(); ++i) {
      if (buffers_[i].first == p) {
        buffers_.erase(buffers_.begin() + i);
        std::free(p);
        return;
      }
    }
    ADD_FAILURE() << "FreeHostBuffer of memory not from AllocateHostBuffer";
  }
  bool PrefersHostBufferInputs() const override { return true; }

 private:
  bool Owned(const void* p) {
    absl::MutexLock lock(&mu_);
    for (const auto& [data, bytes] : buffers_) {
      if (p >= data && p < data + bytes) return true;
    }
    return false;
  }

  std::unique_ptr<Backend> inner_;
  absl::Mutex mu_;
  std::vector<std::pair<uint8_t*, size_t>> buffers_;
};

std::unique_ptr<Backend> MakeHostBufferCpu() { return std::make_unique<HostBufferCpuBackend>(); }

INSTANTIATE_TEST_SUITE_P(Cpu, EngineSuite, ::testing::Values(&MakeCpu));
INSTANTIATE_TEST_SUITE_P(CpuHostBuffers, EngineSuite, ::testing::Values(&MakeHostBufferCpu));

}  // namespace
}  // namespace kvbuffer::testing
