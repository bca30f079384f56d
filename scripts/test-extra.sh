#!/usr/bin/env bash
# Tests beyond ctest: the Python client against a live server, and the Kubernetes manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
KVB_REQUIRE_SERVER=1 KVBUFFER_SERVER_BIN="$PWD/build/bin/kvbuffer-server" bash tools/test-python.sh
bash deploy/validate.sh
