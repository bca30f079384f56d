#include "service/server/backend_factory.h"

#include <string>

#include "absl/strings/str_cat.h"

#if defined(KVB_HAVE_CUDA)
#include "service/engine/cuda/cuda_backend.h"
#endif

namespace kvbuffer::server {

namespace {

absl::StatusOr<std::unique_ptr<Backend>> MakeCuda(const BackendChoice& choice) {
  if (choice.cuda_prefill != "exact" && choice.cuda_prefill != "tensor_core") {
    return absl::InvalidArgumentError(absl::StrCat("--cuda_prefill is \"", choice.cuda_prefill,
                                                   "\", expected exact or tensor_core"));
  }
#if defined(KVB_HAVE_CUDA)
  const int gpus = CudaDeviceCount();
  if (choice.device < 0 || choice.device >= gpus) {
    return absl::FailedPreconditionError(absl::StrCat("--backend=cuda: GPU ", choice.device,
                                                      " is not visible (", gpus, " GPU(s) found)"));
  }
  CudaBackendOptions options;
  options.device = choice.device;
  options.prefill =
      choice.cuda_prefill == "tensor_core" ? CudaPrefillMode::kTensorCore : CudaPrefillMode::kExact;
  std::unique_ptr<Backend> backend = MakeCudaBackend(options);
  if (!backend) return absl::InternalError("could not create the CUDA backend");
  return backend;
#else
  return absl::FailedPreconditionError(
      "--backend=cuda: this build has no CUDA backend (configure with CUDA to get one)");
#endif
}

}  // namespace

bool BuiltWithCuda() {
#if defined(KVB_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const BackendChoice& choice) {
  if (choice.name == "cpu") return MakeCpuBackend();
  if (choice.name == "cuda") return MakeCuda(choice);
  if (choice.name == "auto") {
#if defined(KVB_HAVE_CUDA)
    if (choice.device >= 0 && choice.device < CudaDeviceCount()) return MakeCuda(choice);
#endif
    return MakeCpuBackend();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--backend is \"", choice.name, "\", expected auto, cpu or cuda"));
}

}  // namespace kvbuffer::server
