// The engine's typed suite on the exact CPU backend.
#include "service/engine/engine_test_suite.h"

namespace kvbuffer::testing {
namespace {

std::unique_ptr<Backend> MakeCpu() { return MakeCpuBackend(); }

INSTANTIATE_TEST_SUITE_P(Cpu, EngineSuite, ::testing::Values(&MakeCpu));

}  // namespace
}  // namespace kvbuffer::testing
