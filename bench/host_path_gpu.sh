#!/usr/bin/env bash
# Host path of a decode step on a 2-GPU machine (bench/NOTES.md "Host path"):
#   1. engine_host_bench on this host's CPU (engine over a backend with no math: the host floor);
#   2. gpu_tests (engine suite on CUDA: staged activations and page-locked outputs, device step);
#   3. nccl_group_gpu_test (mode A/B, CUDA shards vs one GPU, inline command blocks);
#   4. tp_bench --profile at B = 256 and 64: tp1 / tp2-nccl / tp2-host, and tp1's step split into
#      engine host, backend host, wait, upload, kernels, download.
# Prebuilt binaries in $BUNDLE/bin (default .gpu; made by /work/shared/gpu/bundle), results in $OUT.
# Usage, from the repository root:  bash bench/host_path_gpu.sh [bench|tests|all]
# (bench: 1 and 4, at most 5.5 minutes by its time limits; tests: 2 and 3, at most 6.5 minutes).
set -uo pipefail
what=${1:-all}
bundle=${BUNDLE:-.gpu}
export LD_LIBRARY_PATH=$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
bin=$bundle/bin
out=${OUT:-host-path-out}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpus.txt"
lscpu | grep -E 'Model name|^CPU\(s\)' | tee -a "$out/gpus.txt"
if [[ $what == bench || $what == all ]]; then
  echo "== engine_host_bench (CPU only; default scan helpers, then none)"
  timeout 45 "$bin/engine_host_bench" --batch=64,256 2>&1 | tee "$out/engine_host_bench.log"
  timeout 45 "$bin/engine_host_bench" --batch=64,256 --scan_helpers=0 2>&1 |
    tee -a "$out/engine_host_bench.log"
fi
if [[ $what == tests || $what == all ]]; then
  echo "== gpu_tests"
  timeout 240 "$bin/gpu_tests" >"$out/gpu_tests.log" 2>&1
  echo "gpu_tests exit $?: $(grep -c '^\[       OK' "$out/gpu_tests.log") ok"
  grep -E '^\[  FAILED|Failure|CUDA error' "$out/gpu_tests.log" | head -20
  echo "== nccl_group_gpu_test"
  timeout 150 "$bin/nccl_group_gpu_test" >"$out/nccl_group_gpu_test.log" 2>&1
  echo "nccl_group_gpu_test exit $?: $(grep -c '^\[       OK' "$out/nccl_group_gpu_test.log") ok"
  grep -E '^\[  FAILED|Failure|relative difference' "$out/nccl_group_gpu_test.log" | head -20
fi
if [[ $what == bench || $what == all ]]; then
  echo "== tp_bench"
  timeout 150 "$bin/tp_bench" --batch=256 --profile --json="$out/tp_bench_b256.json" 2>&1 |
    tee "$out/tp_bench.log"
  timeout 90 "$bin/tp_bench" --batch=64 --profile --fit_check=false \
    --json="$out/tp_bench_b64.json" 2>&1 | tee -a "$out/tp_bench.log"
fi
