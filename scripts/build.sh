#!/usr/bin/env bash
# Configures and builds everything this machine can build (CUDA sources compile whenever nvcc is
# present, GPU or not) into build/, through ccache.
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1 CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
extra=()
if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  extra+=(-DCMAKE_CUDA_COMPILER=)  # no CUDA toolkit: build the CPU parts only
fi
cmake --preset default "${extra[@]}" >/dev/null
cmake --build --preset default -j "${KVB_JOBS:-$(nproc)}"
