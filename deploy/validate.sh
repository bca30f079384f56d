#!/usr/bin/env bash
# Renders every kustomize overlay of deploy/kustomize with `kubectl kustomize` and validates the
# result offline: against the Kubernetes JSON schemas shipped in the kubernetes-validate package
# (strict: unknown fields are errors) for each version in KVB_K8S_VERSIONS, then against the
# project's own rules (deploy/check_manifests.py: GPU limits, gRPC probes on the health names,
# preStop drain within the grace period, headless Service, PDB, flags ConfigMap mounted).
# Needs deploy/setup-tools.sh first. Prints one line per check and "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVB_VENV:-client/python/.venv}"
VERSIONS="${KVB_K8S_VERSIONS:-1.28.0 1.32.0 1.37.0}"
KUBECTL="$VENV/bin/kubectl"
[[ -x "$KUBECTL" ]] || KUBECTL="$(command -v kubectl || true)"
if [[ -z "$KUBECTL" || ! -x "$VENV/bin/kubernetes-validate" ]]; then
  echo "validate: tools missing; run deploy/setup-tools.sh" >&2
  exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
passed=0
failed=0
check() {  # check NAME COMMAND...
  local name="$1"; shift
  if "$@" >"$out/log" 2>&1; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name"
    sed 's/^/    /' "$out/log"
    failed=$((failed + 1))
  fi
}
overlays=(deploy/kustomize/base deploy/kustomize/overlays/*/)
for dir in "${overlays[@]}"; do
  dir="${dir%/}"
  name="${dir#deploy/kustomize/}"
  file="$out/$(echo "$name" | tr / _).yaml"
  check "render $name" sh -c "'$KUBECTL' kustomize '$dir' > '$file' && test -s '$file'"
  [[ -s "$file" ]] || continue
  for v in $VERSIONS; do
    check "schema $name (kubernetes $v, strict)" \
      "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$v" "$file"
  done
  check "rules $name" "$VENV/bin/python" deploy/check_manifests.py "$file" \
    $([[ "$name" == overlays/tp2 ]] && echo --gpus=2 || echo --gpus=1)
done
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
