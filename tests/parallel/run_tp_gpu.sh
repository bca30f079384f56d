#!/usr/bin/env bash
# Tensor parallelism on one host with 2 GPUs (nvidia-h100-x2 or nvidia-h200-x2), in one go:
#   1. multi-GPU tests (service/parallel/nccl_group_gpu_test): NCCL data path bit-exact with CPU
#      shards in mode A (one process) and mode B (a worker process), CUDA shards against one GPU,
#      the engine's typed suite over 2 GPUs, a SIGKILLed worker turning into UNAVAILABLE;
#   2. the benchmark (service/parallel/tp_bench): decode step at B = 256, TP = 2 vs TP = 1 in the
#      same run, outputs checked, sequences that fit per GPU (target: <= 0.6x, x2);
#   3. when the server has its tensor-parallel flags: the mock worker drives every RPC against a
#      TP = 1 server, a mode A server (direct host steps, then steps through NCCL) and a mode B
#      server (rank 1 = kvbuffer-tp-worker).
# Results (logs, JSON) go to $OUT (default ./tp-out). NVLink multicast stays off.
# Usage, from the repository root:  tests/parallel/run_tp_gpu.sh [build-dir]
# With prebuilt binaries (the GPU machine has no gRPC or abseil to build with), e.g. a bundle made
# here by `/work/shared/gpu/bundle .gpu build-lead/bin/...`:
#   BIN=.gpu/bin LD_LIBRARY_PATH=.gpu/lib tests/parallel/run_tp_gpu.sh
# Every step has a time limit (STEP_TIMEOUT scales them, default 1), so a hang costs one step.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
BUILD=${1:-build-tp-gpu}
BIN=${BIN:-}
OUT=${OUT:-$PWD/tp-out}
SCALE=${STEP_TIMEOUT:-1}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
limit() { local s=$1; shift; timeout -k 5 "$((s * SCALE))" "$@"; }  # seconds, command...

step "GPUs"
nvidia-smi -L | tee "$OUT/gpus.txt"
nvidia-smi topo -m | tee -a "$OUT/gpus.txt"
if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then echo "needs 2 GPUs"; exit 2; fi

have_server=0
if [ -n "$BIN" ]; then
  step "prebuilt binaries ($BIN)"
  for b in nccl_group_gpu_test tp_bench kvbuffer-tp-worker; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b"; exit 1; }
  done
  [ -x "$BIN/kvbuffer-server" ] && [ -x "$BIN/kvbuffer-mock-worker" ] && have_server=1
  ldd "$BIN/tp_bench" | grep -E 'not found|nccl|cudart' | tee "$OUT/ldd.txt"
else
  step "build ($BUILD)"
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  targets="nccl_group_gpu_test tp_bench kvbuffer-tp-worker"
  if ninja -C "$BUILD" -t targets all 2>/dev/null | grep -q '^kvbuffer-server:'; then
    targets="$targets kvbuffer-server kvbuffer-mock-worker"
    have_server=1
  fi
  ninja -C "$BUILD" -j"$(nproc)" $targets >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  BIN=$BUILD/bin
fi

step "1. multi-GPU tests"
limit "${GPU_TEST_TIMEOUT:-150}" "$BIN/nccl_group_gpu_test" \
  --gtest_output="json:$OUT/nccl_group_gpu_test.json" 2>&1 |
  tee "$OUT/nccl_group_gpu_test.log" | grep -E '^\[ *(FAILED|SKIPPED|PASSED) *\]|relative difference|Failure'
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "nccl_group_gpu_test: FAILED or timed out"; }
echo "$(grep -c '^\[ *OK *\]' "$OUT/nccl_group_gpu_test.log") test(s) OK"

if [ -x "$BIN/gpu_tests" ]; then
  # The CudaBackend parts tensor parallelism leans on: strided output rows, the sync timeout.
  limit 60 "$BIN/gpu_tests" --gtest_filter='CudaHostStep.*:CudaDeviceStep.*' 2>&1 |
    tee "$OUT/gpu_tests_tp.log" | grep -E '^\[ *(FAILED|PASSED) *\]|Failure'
  [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "gpu_tests (TP parts): FAILED"; }
fi

step "2. benchmark"
# tp1, tp2 (direct host steps, mode A as served) and tp2-protocol (steps through NCCL), with
# per-phase profiles; then B = 64; then the same per-rank path on one GPU (tp1-fanout).
limit 150 "$BIN/tp_bench" --batch=256 --profile --json="$OUT/tp_bench_b256.json" 2>&1 |
  tee "$OUT/tp_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "tp_bench B=256: FAILED or timed out"; }
limit 60 "$BIN/tp_bench" --batch=64 --fit_check=false --json="$OUT/tp_bench_b64.json" 2>&1 |
  tee -a "$OUT/tp_bench.log"
limit 90 "$BIN/tp_bench" --batch=256 --layers=18 --tp1_fanout --protocol=false --fit_check=false \
  --profile --json="$OUT/tp_bench_b256_fanout.json" 2>&1 | tee -a "$OUT/tp_bench.log"
# The same number of host threads on both sides: tp1's engine with one scan helper (2 threads),
# tp2 with one copy thread per rank (2 threads).
limit 90 "$BIN/tp_bench" --batch=256 --layers=18 --protocol=false --fit_check=false \
  --profile --scan_helpers=1 --copy_threads=1 --json="$OUT/tp_bench_b256_threads.json" 2>&1 |
  tee -a "$OUT/tp_bench.log"

step "3. service level with the mock worker"
help=$([ "$have_server" -eq 1 ] && "$BIN/kvbuffer-server" --helpfull 2>&1)  # exits 1 after help
if [ "$have_server" -eq 1 ] && grep -q -- '--tensor_parallel' <<<"$help"; then
  serve() {  # name, extra server flags...; prints the port once it listens
    local name=$1; shift
    "$BIN/kvbuffer-server" --backend=cuda --model=small --port=0 --tp_init_timeout_seconds=60 "$@" \
      >"$OUT/server_$name.out" 2>"$OUT/server_$name.err" &
    echo $! >"$OUT/server_$name.pid"
    for _ in $(seq 900); do grep -q '^listening on' "$OUT/server_$name.out" && break; sleep 0.1; done
    sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$OUT/server_$name.out"
  }
  drive() {  # name, port
    if [ -z "$2" ]; then echo "$1: server did not start"; tail -5 "$OUT/server_$1.err"; return 1; fi
    limit 75 "$BIN/kvbuffer-mock-worker" --server="127.0.0.1:$2" --mode=unary --concurrency=2 \
      >"$OUT/mock_$1_unary.log" 2>&1 && \
    limit 75 "$BIN/kvbuffer-mock-worker" --server="127.0.0.1:$2" --mode=stream --concurrency=2 \
      >"$OUT/mock_$1_stream.log" 2>&1
    local rc=$?; echo "$1: mock worker rc=$rc"
    grep -h -E 'kvbuffer-mock-worker: |accuracy|server ' "$OUT/mock_$1_unary.log" "$OUT/mock_$1_stream.log" 2>/dev/null
    return $rc
  }
  stop() {  # name: SIGTERM, then wait for the process to end (SIGKILL after 20 s)
    local pid; pid=$(cat "$OUT/server_$1.pid")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    tail -2 "$OUT/server_$1.err"
  }
  p=$(serve tp1); drive tp1 "$p" || status=1; stop tp1
  p=$(serve tp2a --tensor_parallel=2 --tp_mode=threads --tp_devices=0,1); drive tp2a "$p" || status=1; stop tp2a
  grep -h 'tensor parallel' "$OUT/server_tp2a.err"
  # Mode A with every step through the NCCL protocol (--tp_direct_host_steps=false).
  p=$(serve tp2a_protocol --tensor_parallel=2 --tp_mode=threads --tp_devices=0,1 \
    --tp_direct_host_steps=false)
  drive tp2a_protocol "$p" || status=1; stop tp2a_protocol
  grep -h 'tensor parallel' "$OUT/server_tp2a_protocol.err"
  # Mode B: rank 1 first (it keeps trying to join until rank 0 serves the bootstrap).
  limit 300 "$BIN/kvbuffer-tp-worker" --leader=127.0.0.1:7070 --device=1 >"$OUT/tp_worker.log" 2>&1 &
  worker=$!
  p=$(serve tp2b --tensor_parallel=2 --tp_mode=processes --tp_bootstrap=127.0.0.1:7070 --device=0)
  drive tp2b "$p" || status=1; stop tp2b
  grep -h 'tensor parallel' "$OUT/server_tp2b.err"
  wait "$worker"; echo "tp worker exit $? (0: shut down by rank 0)"
  grep -h "shut down\|rank" "$OUT/tp_worker.log" | tail -2
else
  echo "skipped: kvbuffer-server has no --tensor_parallel flag yet (see service/parallel/README.md)"
fi

step "done (status $status); results in $OUT"
exit $status
