#!/usr/bin/env bash
# Builds the libFuzzer target over request decoding and validation with clang
# (-fsanitize=fuzzer,address,undefined) in build-fuzz/ and runs its bounded smoke test from the
# committed seed corpus (tests/fuzz/corpus/): ctest -L fuzz. Needs the Debian packages clang-14
# and libclang-rt-14-dev (scripts/setup.sh).
# Environment: KVB_FUZZ_SECONDS (60) length of the run; KVB_JOBS (2); CXX_FUZZ (clang++-14).
# Longer runs by hand: build-fuzz/bin/kvb_request_fuzzer -max_total_time=3600 DIR tests/fuzz/corpus
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
cxx=${CXX_FUZZ:-clang++-14}
cc=${cxx/clang++/clang}
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
start=$SECONDS
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVB_WITH_CUDA=OFF \
  -DKVB_FUZZ=ON -DKVB_FUZZ_SECONDS="${KVB_FUZZ_SECONDS:-60}" \
  -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_C_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build build-fuzz -j "${KVB_JOBS:-2}" --target kvb_request_fuzzer kvb_request_fuzz_replay
built=$SECONDS
status=0
ctest --test-dir build-fuzz -L "fuzz" --output-on-failure || status=$?
# The run's own summary (inputs executed, coverage, peak RSS); its full log is kept.
cp build-fuzz/Testing/Temporary/LastTest.log build-fuzz/fuzz-smoke.log
grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)|^(==[0-9]+==|SUMMARY|artifact_prefix)" \
  build-fuzz/fuzz-smoke.log | sed 's/^/fuzz: /' || true
((status == 0)) || exit "$status"
ctest --test-dir build-fuzz -R request_fuzz_corpus --output-on-failure
echo "fuzz: build $((built - start)) s, run $((SECONDS - built)) s"
