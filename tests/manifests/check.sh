#!/usr/bin/env bash
# Validates the Kubernetes packaging (deploy/, deploy/examples/, the Helm
# chart, the Dockerfile, the e2e script); see check.py for the list of checks.
# Needs the venv of tests/manifests/requirements.txt, by default target/venv:
#   python3 -m venv target/venv
#   target/venv/bin/pip install -r tests/manifests/requirements.txt
# VDUSE_CSI_VENV=/path/to/venv overrides it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${VDUSE_CSI_VENV:-$root/target/venv}"
py="$venv/bin/python"

if [[ ! -x "$py" ]] || ! "$py" -c 'import kubernetes_validate, helm_python, yaml, jsonschema' 2>/dev/null; then
    echo "tests/manifests/check.sh: the Python packages are missing from $venv; install them with:" >&2
    echo "  python3 -m venv '$venv' && '$venv/bin/pip' install -r '$root/tests/manifests/requirements.txt'" >&2
    exit 2
fi

exec "$py" "$root/tests/manifests/check.py" "$@"
