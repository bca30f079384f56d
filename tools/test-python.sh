#!/usr/bin/env bash
# Runs the Python client's pytest suite against a live kvbuffer-server (CPU backend, tiny model,
# ephemeral ports). The server binary: $KVBUFFER_SERVER_BIN, else the newest
# build*/bin/kvbuffer-server. Without one the server tests skip with a message, unless
# KVB_REQUIRE_SERVER=1 (CI), which makes a missing binary an error.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVB_VENV:-client/python/.venv}"
bash tools/setup-python.sh
if [[ "${KVB_REQUIRE_SERVER:-0}" == 1 && -z "${KVBUFFER_SERVER_BIN:-}" ]]; then
  bin="$(ls -t build*/bin/kvbuffer-server 2>/dev/null | head -1 || true)"
  [[ -n "$bin" ]] || { echo "test-python: no kvbuffer-server binary (KVB_REQUIRE_SERVER=1)" >&2; exit 1; }
  export KVBUFFER_SERVER_BIN="$PWD/$bin"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
cd client/python
exec "$PY" -m pytest -q -rs -p no:cacheprovider tests "$@"
