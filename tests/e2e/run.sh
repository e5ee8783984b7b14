#!/usr/bin/env bash
# The kubelet end-to-end test: prepares (once, cached) Kubernetes 1.20 binaries, the CSI
# sidecars and images (tests/e2e/prepare.sh), builds our image from the Dockerfile
# (tests/e2e/install-images.sh) and renders the Helm chart (tests/e2e/render-chart.py), then
# boots the VDUSE test guest and runs tests/e2e/guest-kubelet.sh in it: etcd, the control
# plane, containerd and kubelet on loopback, a one-node Ceph, the driver installed with
# `kubectl apply`, and the scenarios in tests/e2e/scenarios.sh.
#
# Usage: tests/e2e/run.sh [OUT_DIR]   (env: VDUSE_CSI_BIN, default target/debug/vduse-csi;
#        VDUSE_CSI_E2E_CACHE; E2E_FILTER, a substring of the scenario names to run)
# Prints "RESULT name PASS|FAIL" lines; exits non-zero unless every scenario passed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export VDUSE_CSI_E2E_CACHE=${VDUSE_CSI_E2E_CACHE:-/var/cache/vduse-csi-e2e}
export VDUSE_CSI_BIN=${VDUSE_CSI_BIN:-$repo/target/debug/vduse-csi}
export E2E_FILTER=${E2E_FILTER:-}
out=${1:-$repo/target/guest/e2e}
[[ -x $VDUSE_CSI_BIN ]] || { echo "e2e: no $VDUSE_CSI_BIN (cargo build first)" >&2; exit 1; }
"$repo/tests/e2e/prepare.sh"
rm -rf "$out"
# Our image and the rendered chart change with the checkout: beside the guest's output.
built=$out.host
mkdir -p "$built"
export VDUSE_CSI_IMAGE=$built/vduse-csi.tar VDUSE_CSI_CHART_RBD=$built/chart-rbd.yaml
"$repo/tests/e2e/install-images.sh" "$VDUSE_CSI_BIN" "$VDUSE_CSI_IMAGE"
"$repo/target/venv/bin/python" "$repo/tests/e2e/render-chart.py" "$VDUSE_CSI_CHART_RBD"
export GUEST_ENV="VDUSE_CSI_BIN VDUSE_CSI_E2E_CACHE VDUSE_CSI_IMAGE VDUSE_CSI_CHART_RBD E2E_FILTER"
# Kubernetes, Ceph, and containerd's images on tmpfs.
export GUEST_MEM=${GUEST_MEM:-8192} GUEST_TIMEOUT=${GUEST_TIMEOUT:-3000} GUEST_TMP_SIZE=${GUEST_TMP_SIZE:-2g}
export GUEST_QUIET=${GUEST_QUIET:-1}
status=0
"$repo/tests/guest/run.sh" "$repo/tests/e2e/guest-kubelet.sh" "$out" || status=$?
grep -h "^e2e " "$out/output.log" || true
cat "$out/results" 2>/dev/null || echo "e2e: no results (see $out/console.log)"
exit "$status"
