#!/usr/bin/env bash
# One device session: card facts, GPU tests, compute-sanitizer, benchmark and plot. Run from the
# repository root on the GPU machine with the bundle from /work/shared/gpu/bundle in .gpu/:
#   bash bench/gpu_session.sh COMMIT [tests|bench|all]
# Logs and results go to $OUT (or ./gpu-out).
set -uo pipefail
commit=${1:-unknown}
what=${2:-all}
out=${OUT:-gpu-out}
mkdir -p "$out"
srvbin=.gpu/bin
if [[ -d .gpus ]]; then srvbin=.gpus/bin; fi
export LD_LIBRARY_PATH=.gpu/lib:.gpus/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv,noheader
if [[ $what == tests || $what == all ]]; then
  timeout 240 .gpu/bin/gpu_tests > "$out/gpu_tests.log" 2>&1
  echo "gpu_tests exit $?: $(grep -cE '^\[       OK' "$out/gpu_tests.log") ok, $(grep -cE '^\[  FAILED' "$out/gpu_tests.log") failed lines"
  grep -E "^\[  FAILED|error vs|Failure|Expected|Which is|CUDA error" "$out/gpu_tests.log" | head -30
  small='CudaBackend.TinyMatchesCpuAndOracle:CudaBackend.WideHeadsMatchCpuAndOracle:CudaBackend.PoisonedOutputsAreAllWritten:RecurrentKernel.*:CudaBackend.TensorCorePrefill*:Cuda/EngineSuite.DecodeMatchesOracleAcrossThreeFlushes*'
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 7 .gpu/bin/gpu_tests \
      --gtest_filter="$small" > "$out/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi
if [[ $what == bench || $what == all ]]; then
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9._-')
  json="$out/$card-$(date -u +%Y-%m-%d).json"
  timeout 400 .gpu/bin/kvbuffer-bench --commit "$commit" --out "$json" > "$out/bench.log" 2>&1
  echo "bench exit $?"
  grep -vE "^(fp32|bf16) C=" "$out/bench.log" | tail -40
  python3 bench/plot_results.py "$json" "$out/latency_vs_batch.png" > "$out/tables.md" 2>&1
fi
if [[ $what == server || $what == all ]]; then
  # kvbuffer-server --backend=cuda against mock workers that check every answer (fp64 oracle).
  for spec in "small:unary:" "small:stream:" "small:stream:--cuda_prefill=tensor_core" \
              "qwen3-next-80b-a3b:stream:--layers=2"; do
    IFS=: read -r model mode extra <<< "$spec"
    sflags="--backend=cuda --model=$model --host=127.0.0.1 --port=0"
    wflags="--mode=$mode"
    case "$extra" in
      --cuda_prefill=*) sflags="$sflags $extra"; wflags="$wflags --tolerance=3e-2" ;;
      --layers=*) wflags="$wflags $extra --sequences=8 --steps=24" ;;
    esac
    log="$out/server_${model}_${mode}.log"
    $srvbin/kvbuffer-server $sflags > "$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do grep -q "listening on" "$log" && break; sleep 0.1; done
    addr=$(grep -o "listening on [^ ]*" "$log" | head -1 | awk '{print $3}')
    timeout 240 $srvbin/kvbuffer-mock-worker --server="$addr" $wflags > "$out/worker.log" 2>&1
    rc=$?
    echo "mock worker ($model, $mode $extra): exit $rc; $(tail -3 "$out/worker.log" | tr '\n' ' ')"
    kill -TERM $pid; wait $pid
  done
fi
