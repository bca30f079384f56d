#!/usr/bin/env bash
# The main job in one command: sets up, builds, starts kvbuffer-server (CUDA backend when a GPU is
# present, else the embedded CPU backend) on an ephemeral loopback port, runs a mock-worker session
# that checks every answer against its fp64 oracle and prints its summary, then stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
model=${KVB_DEMO_MODEL:-small}
log=$(mktemp)
build/bin/kvbuffer-server --backend=auto --model="$model" --host=127.0.0.1 --port=0 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
addr=$(grep -o "listening on [^ ]*" "$log" | head -1 | awk '{print $3}')
[[ -n "$addr" ]] || { cat "$log"; echo "demo: server did not start" >&2; exit 1; }
echo "demo: kvbuffer-server ($model) at $addr"
build/bin/kvbuffer-mock-worker --server="$addr" "$@"
kill -TERM "$server"
wait "$server"
echo "demo: server stopped cleanly"
