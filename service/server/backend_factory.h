// Picks and creates the engine's Backend from the --backend flags.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "service/engine/backend.h"

namespace kvbuffer::server {

struct BackendChoice {
  std::string name = "auto";  // "auto", "cpu" or "cuda"
  int device = 0;             // GPU index for cuda
  // cuda prefill: "exact" (fp32, matches the fp64 oracle to ~1e-6) or "tensor_core" (bf16 UT
  // form on tensor cores, ~1e-2).
  std::string cuda_prefill = "exact";
};

// Creates the backend `choice` names: "cpu"; "cuda" (FAILED_PRECONDITION when this build has no
// CUDA or the GPU is not visible); "auto" = cuda when built with it and a GPU is visible, else cpu.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const BackendChoice& choice);

// Whether this binary was built with the CUDA backend.
bool BuiltWithCuda();

}  // namespace kvbuffer::server
