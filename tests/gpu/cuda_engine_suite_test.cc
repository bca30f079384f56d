// The engine's typed test suite on the exact CUDA backend (skips without a GPU).
#include "service/engine/engine_test_suite.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvbuffer::testing {
namespace {

std::unique_ptr<Backend> MakeCuda() {
  if (!HaveGpu()) {
    std::fprintf(stderr, "no CUDA device visible: the CUDA engine suite is skipped\n");
    return nullptr;
  }
  return MakeCudaBackend(0);
}

INSTANTIATE_TEST_SUITE_P(Cuda, EngineSuite, ::testing::Values(&MakeCuda));

}  // namespace
}  // namespace kvbuffer::testing
