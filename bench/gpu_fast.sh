#!/usr/bin/env bash
# A short device call for kernel work: GPU tests, compute-sanitizer memcheck on the small tests,
# then `kvbuffer-bench --fast` (default v7 streaming kernels vs v5 head kernel and 64-column
# streaming tiles in one run) and the plot. Logs to $OUT.
#   bash bench/gpu_fast.sh COMMIT
set -uo pipefail
commit=${1:-unknown}
out=${OUT:-gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader
timeout 170 .gpu/bin/gpu_tests > "$out/gpu_tests.log" 2>&1
echo "gpu_tests exit $?: $(grep -cE '^\[       OK' "$out/gpu_tests.log") ok, $(grep -cE '^\[  FAILED' "$out/gpu_tests.log") failed lines"
grep -E "^\[  FAILED|error vs|difference|Failure|Expected|Which is|CUDA error" "$out/gpu_tests.log" | head -30
small='CudaDeviceStep.*:CudaBackend.TinyMatchesCpuAndOracle:CudaBackend.PoisonedOutputsAreAllWritten:Cuda/EngineSuite.DecodeMatchesOracleAcrossThreeFlushes*'
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 7 .gpu/bin/gpu_tests \
  --gtest_filter="$small" > "$out/sanitizer_memcheck.log" 2>&1
echo "compute-sanitizer memcheck: exit $? ; $(grep -E 'ERROR SUMMARY' "$out/sanitizer_memcheck.log" | tail -1)"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9._-')
json="$out/$card-$(date -u +%Y-%m-%d).json"
timeout 330 .gpu/bin/kvbuffer-bench --fast --commit "$commit" --out "$json" > "$out/bench.log" 2>&1
echo "bench exit $?"
grep -vE "^(fp32|bf16) C=|^variant " "$out/bench.log" | tail -32
python3 bench/plot_results.py "$json" "$out/latency_vs_batch.png" > "$out/tables.md" 2>&1 || true
