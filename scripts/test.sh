#!/usr/bin/env bash
# Sets up, builds and runs every test this machine can run: unit, integration, Python client,
# manifest validation. GPU tests skip with a message where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --preset default
if [[ -f scripts/test-extra.sh ]]; then bash scripts/test-extra.sh; fi
