#!/usr/bin/env bash
# Sanitizer builds of the unit and integration suites (CPU only):
#   asan  ASan + UBSan (preset "asan", build-asan/): ctest -L "unit|integration"
#   tsan  TSan (preset "tsan", build-tsan/): ctest -L "$KVB_TSAN_LABELS" (default "unit|integration")
# Every process a test starts (kvbuffer-server, kvbuffer-mock-worker) writes its sanitizer reports
# under build-*/sanitizer-logs/; any report there fails the run, even when the test that started
# the process did not look at its exit code.
#
# TSan: Debian's gRPC, protobuf and Abseil are not TSan-instrumented. The run preloads
# build-tsan/tests/sanitizers/libkvb_tsan_absl_mutex.so (absl::Mutex made visible to TSan) and
# uses tests/sanitizers/tsan.supp (scoped to those libraries; see docs/reliability.md). The
# tsan_canary_test proves that races in our own code are still reported under exactly this setup.
#
# Usage: scripts/sanitizers.sh [asan|tsan|all] [extra ctest args...]   (default: all)
#        scripts/sanitizers.sh env tsan    prints the environment to run one TSan binary by hand
# Environment: KVB_JOBS (2), KVB_TSAN_LABELS ("unit|integration"), KVB_TSAN_EXCLUDE (a ctest -E
# regex of tests TSan skips; scripts/test.sh, i.e. CI, sets the long math sweeps
# '^(Shards/|ChunkedPrefillTest\.)|PrefillEveryLengthTo300'; unset here: every test).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1
jobs=${KVB_JOBS:-2}
what=${1:-all}
[[ $# -gt 0 ]] && shift

asan_env() {
  local logs=$root/build-asan/sanitizer-logs
  echo "ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:log_path=$logs/asan"
  echo "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan"
  echo "LSAN_OPTIONS=suppressions=$root/tests/sanitizers/lsan.supp"
}

tsan_env() {
  local logs=$root/build-tsan/sanitizer-logs
  echo "TSAN_OPTIONS=suppressions=$root/tests/sanitizers/tsan.supp history_size=4 second_deadlock_stack=1 log_path=$logs/tsan"
  echo "LD_PRELOAD=$root/build-tsan/tests/sanitizers/libkvb_tsan_absl_mutex.so"
}

# Fails when any process left a sanitizer report under $1.
check_logs() {
  local dir=$1 found=0
  shopt -s nullglob
  for f in "$dir"/*; do
    if grep -qE "ERROR: (Address|Leak|Undefined)Sanitizer|WARNING: ThreadSanitizer|runtime error:" "$f"; then
      echo "sanitizers: report in $f:" >&2
      head -60 "$f" >&2
      found=1
    fi
  done
  return $found
}

run() {  # run <preset> <labels> <env function> [ctest args]
  local preset=$1 labels=$2 envf=$3
  shift 3
  local dir=$root/build-$preset start=$SECONDS
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  local built=$SECONDS
  rm -rf "$dir/sanitizer-logs" && mkdir -p "$dir/sanitizer-logs"
  local status=0
  (
    while IFS= read -r kv; do export "${kv?}"; done < <($envf)
    ctest --test-dir "$dir" -L "$labels" -j "$jobs" --output-on-failure --timeout 1800 "$@"
  ) || status=$?
  # Tests expecting a report (the TSan canary) write theirs to stderr, not here.
  check_logs "$dir/sanitizer-logs" || status=1
  echo "sanitizers: $preset build $((built - start)) s, tests $((SECONDS - built)) s, status $status"
  return $status
}

case $what in
  env)
    case ${1:-tsan} in
      asan) asan_env ;;
      tsan) tsan_env ;;
    esac
    ;;
  asan) run asan "unit|integration" asan_env "$@" ;;
  tsan) run tsan "${KVB_TSAN_LABELS:-unit|integration}" tsan_env ${KVB_TSAN_EXCLUDE:+-E "$KVB_TSAN_EXCLUDE"} "$@" ;;
  all)
    s=0
    run asan "unit|integration" asan_env "$@" || s=1
    run tsan "${KVB_TSAN_LABELS:-unit|integration}" tsan_env \
      ${KVB_TSAN_EXCLUDE:+-E "$KVB_TSAN_EXCLUDE"} "$@" || s=1
    exit $s
    ;;
  *)
    echo "usage: $0 [asan|tsan|all|env asan|env tsan] [ctest args...]" >&2
    exit 2
    ;;
esac
