#!/usr/bin/env bash
# Installs every dependency KVBuffer needs on a fresh Debian 12 machine (as root, or through sudo).
# Idempotent: re-running it only installs what is missing.
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev libspdlog-dev libssl-dev
  python3 python3-pip python3-venv openssl
  # Sanitizer and fuzz stages of scripts/test.sh: clang with libFuzzer and the sanitizer runtimes
  # (scripts/fuzz.sh), llvm-symbolizer for readable reports (llvm-14). The gcc ASan/UBSan/TSan
  # runtimes come with gcc.
  clang-14 libclang-rt-14-dev llvm-14
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: system packages ready"

# Python client venv (grpcio, numpy, pytest) and offline manifest-validation tools, from PyPI.
bash tools/setup-python.sh
bash deploy/setup-tools.sh
