#!/usr/bin/env bash
# Sets up, builds and runs every test this machine can run, stage by stage:
#   setup       scripts/setup.sh (system packages, Python venv, manifest tools)
#   build       scripts/build.sh (build/; CUDA sources compile whenever nvcc is present)
#   ctest       unit, integration, load and fuzz-corpus tests (GPU tests skip without a GPU)
#   extra       scripts/test-extra.sh: Python client against live servers, Kubernetes manifests
#   asan        scripts/sanitizers.sh asan: ASan+UBSan build (build-asan/) of the unit and
#               integration suites; any sanitizer report fails it
#   tsan        scripts/sanitizers.sh tsan: the same under TSan (build-tsan/), less the
#               long math sweeps ($KVB_TSAN_EXCLUDE, below)
#   fuzz        scripts/fuzz.sh: libFuzzer build (build-fuzz/) and a bounded smoke run
#               (KVB_FUZZ_SECONDS, 60) from the committed corpus; a crash or report fails it
# Prints the wall time of each stage at the end (also when a stage fails).
# KVB_QUICK=1 stops after `extra` (no sanitizer or fuzz stage), for quick local runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# The TSan stage skips the long math sweeps, which spend minutes under TSan in code it has already
# seen: the exactness sweeps over CPU shard layouts (Shards/*), the chunked-prefill kernel sweeps
# (ChunkedPrefillTest.*) and the every-prompt-length-to-300 engine sweep of each backend. The
# threaded backends (concurrent shards, in-process tensor parallelism) stay covered by the rest of
# their engine suites and by TpBackendTest; ASan and the plain build run everything.
export KVB_TSAN_EXCLUDE="${KVB_TSAN_EXCLUDE-^(Shards/|ChunkedPrefillTest\.)|PrefillEveryLengthTo300}"

times=()
stage() {  # stage NAME COMMAND...
  local name=$1 start=$SECONDS
  shift
  echo "test: stage $name"
  "$@"
  times+=("$(printf '%-6s %5d s' "$name" $((SECONDS - start)))")
}
summary() {
  echo "test: stage wall times"
  if ((${#times[@]})); then printf '  %s\n' "${times[@]}"; fi
}
trap summary EXIT

stage setup bash scripts/setup.sh
stage build bash scripts/build.sh
stage ctest ctest --preset default
if [[ -f scripts/test-extra.sh ]]; then stage extra bash scripts/test-extra.sh; fi
if [[ "${KVB_QUICK:-0}" == 1 ]]; then
  echo "test: KVB_QUICK=1: sanitizer and fuzz stages skipped"
  exit 0
fi
stage asan bash scripts/sanitizers.sh asan
stage tsan bash scripts/sanitizers.sh tsan
stage fuzz bash scripts/fuzz.sh
