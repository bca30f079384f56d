#!/usr/bin/env bash
# Tensor parallelism on one host with 2 GPUs (nvidia-h100-x2 or nvidia-h200-x2), in one go:
#   1. multi-GPU tests (service/parallel/nccl_group_gpu_test): NCCL data path bit-exact with CPU
#      shards in mode A (one process) and mode B (a worker process), CUDA shards against one GPU,
#      the engine's typed suite over 2 GPUs, a SIGKILLed worker turning into UNAVAILABLE;
#   2. the benchmark (service/parallel/tp_bench): decode step at B = 256, TP = 2 vs TP = 1 in the
#      same run, outputs checked, sequences that fit per GPU (target: <= 0.6x, x2);
#   3. when the server has its tensor-parallel flags: the mock worker drives every RPC against a
#      TP = 1 server, a mode A server and a mode B server (rank 1 = kvbuffer-tp-worker).
# Results (logs, JSON) go to $OUT (default ./tp-out). NVLink multicast stays off.
# Usage, from the repository root:  tests/parallel/run_tp_gpu.sh [build-dir]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
BUILD=${1:-build-tp-gpu}
OUT=${OUT:-$PWD/tp-out}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $*"; }

step "GPUs"
nvidia-smi -L | tee "$OUT/gpus.txt"
nvidia-smi topo -m | tee -a "$OUT/gpus.txt"
if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then echo "needs 2 GPUs"; exit 2; fi

step "build ($BUILD)"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
targets="nccl_group_gpu_test tp_bench kvbuffer-tp-worker"
have_server=0
if ninja -C "$BUILD" -t targets all 2>/dev/null | grep -q '^kvbuffer-server:'; then
  targets="$targets kvbuffer-server kvbuffer-mock-worker"
  have_server=1
fi
ninja -C "$BUILD" -j"$(nproc)" $targets >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }

step "1. multi-GPU tests"
"$BUILD/bin/nccl_group_gpu_test" --gtest_output="json:$OUT/nccl_group_gpu_test.json" 2>&1 |
  tee "$OUT/nccl_group_gpu_test.log" | grep -E '^\[ *(OK|FAILED|SKIPPED|PASSED) *\]|relative difference'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "2. benchmark"
"$BUILD/bin/tp_bench" --batch=256 --json="$OUT/tp_bench_b256.json" 2>&1 | tee "$OUT/tp_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$BUILD/bin/tp_bench" --batch=64 --fit_check=false --json="$OUT/tp_bench_b64.json" 2>&1 |
  tee -a "$OUT/tp_bench.log"

step "3. service level with the mock worker"
if [ "$have_server" -eq 1 ] && "$BUILD/bin/kvbuffer-server" --helpfull 2>&1 | grep -q -- '--tensor_parallel'; then
  serve() {  # name, extra server flags...
    local name=$1; shift
    "$BUILD/bin/kvbuffer-server" --backend=cuda --model=small --port=0 "$@" \
      >"$OUT/server_$name.out" 2>"$OUT/server_$name.err" &
    echo $! >"$OUT/server_$name.pid"
    for _ in $(seq 600); do grep -q '^listening on' "$OUT/server_$name.out" && break; sleep 0.1; done
    sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$OUT/server_$name.out"
  }
  drive() {  # name, port
    "$BUILD/bin/kvbuffer-mock-worker" --server="127.0.0.1:$2" --mode=unary --concurrency=2 \
      >"$OUT/mock_$1_unary.log" 2>&1 && \
    "$BUILD/bin/kvbuffer-mock-worker" --server="127.0.0.1:$2" --mode=stream --concurrency=2 \
      >"$OUT/mock_$1_stream.log" 2>&1
    local rc=$?; echo "$1: mock worker rc=$rc"; tail -3 "$OUT/mock_$1_stream.log"; return $rc
  }
  stop() { kill -TERM "$(cat "$OUT/server_$1.pid")" 2>/dev/null; wait "$(cat "$OUT/server_$1.pid")" 2>/dev/null; }
  p=$(serve tp1); drive tp1 "$p" || status=1; stop tp1
  p=$(serve tp2a --tensor_parallel=2 --tp_mode=threads --tp_devices=0,1); drive tp2a "$p" || status=1; stop tp2a
  # Mode B: rank 1 first (it keeps trying to join until rank 0 serves the bootstrap).
  "$BUILD/bin/kvbuffer-tp-worker" --leader=127.0.0.1:7070 --device=1 >"$OUT/tp_worker.log" 2>&1 &
  worker=$!
  p=$(serve tp2b --tensor_parallel=2 --tp_mode=processes --tp_bootstrap=127.0.0.1:7070 --device=0)
  drive tp2b "$p" || status=1; stop tp2b
  wait "$worker"; echo "tp worker exit $? (0: shut down by rank 0)"
  grep -h "shut down\|rank" "$OUT/tp_worker.log" | tail -2
else
  echo "skipped: kvbuffer-server has no --tensor_parallel flag yet (see service/parallel/README.md)"
fi

step "done (status $status); results in $OUT"
exit $status
