#!/usr/bin/env bash
# End-to-end test of vduse-csi on a real cluster. It is NOT part of the test
# command: it needs Docker (a running daemon), kind and kubectl, a Linux host
# whose kernel has VDUSE (modules vduse, vdpa, virtio_vdpa, virtio_blk), root
# or sudo to load those modules, and network access to registry.k8s.io,
# Docker Hub and GitHub (sidecar images, busybox, external-snapshotter).
#
# What it does: loads the modules on the host (kind nodes share the host's
# kernel), creates a kind cluster, builds the plugin image and loads it into
# the cluster, installs the external-snapshotter CRDs and snapshot-controller
# (pinned, with distributed snapshotting), applies deploy/, then runs
# deploy/examples/: writes and verifies data, re-mounts it in a new pod,
# expands the PVC online, snapshots it and restores the snapshot into a new
# PVC, and runs the raw block example. Everything is removed on exit.
#
#   tests/e2e/kind.sh
#
# Environment:
#   E2E_CLUSTER=kind       create a kind cluster (default), or
#   E2E_CLUSTER=current    use the current kubectl context (e.g. a one-node
#                          kubeadm/k3s/minikube --driver=none cluster on a VDUSE
#                          host); IMAGE must then already be on the nodes
#   CLUSTER_NAME           kind cluster name (vduse-csi-e2e)
#   KIND_NODE_IMAGE        kind node image (kind's default)
#   IMAGE                  plugin image (vduse-csi:<version from Cargo.toml>)
#   SNAPSHOTTER_VERSION    external-snapshotter release (v8.6.0)
#   KEEP_CLUSTER=1         keep the kind cluster on exit
#   E2E_IGNORE_NETNS=1     go on although the kind node cannot see the vdpa
#                          netlink family (see below)
#
# Known limitation of kind: a kind node is a container with its own network
# namespace, and the kernel's vdpa generic-netlink family exists only in the
# host's initial network namespace. The plugin's hostNetwork there is the
# node container's namespace, so attaching a device (vdpa dev add) cannot work
# unless the plugin reaches the initial namespace some other way. The script
# checks this up front and stops with an explanation. Also, a kind node's
# /dev is a snapshot taken when the node starts, so the script bind-mounts the
# host's /dev into the node at /host-dev and points the plugin's /dev volume
# there, letting /dev/vduse/<name> and /dev/vdX created later show up.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

E2E_CLUSTER="${E2E_CLUSTER:-kind}"
CLUSTER_NAME="${CLUSTER_NAME:-vduse-csi-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
SNAPSHOTTER_VERSION="${SNAPSHOTTER_VERSION:-v8.6.0}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
E2E_IGNORE_NETNS="${E2E_IGNORE_NETNS:-0}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
IMAGE="${IMAGE:-vduse-csi:${version}}"
NS=vduse-csi
TEST_NS=vduse-e2e
DRIVER=vduse.csi.dev
snap_raw="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/${SNAPSHOTTER_VERSION}"

log() { printf '\n=== %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
missing=()
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
if [[ "$E2E_CLUSTER" == kind ]]; then
    for tool in docker kind; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
fi
if ((${#missing[@]})); then
    echo "tests/e2e/kind.sh needs Docker, kind and kubectl; missing: ${missing[*]}." >&2
    echo "Install them (and start the Docker daemon) to run the end-to-end test." >&2
    echo "It is not part of the test command: tests/manifests/check.sh validates the manifests without a cluster." >&2
    exit 2
fi
case "$E2E_CLUSTER" in
    kind)
        docker info >/dev/null 2>&1 || { echo "tests/e2e/kind.sh: the Docker daemon is not reachable (docker info failed)." >&2; exit 2; }
        ;;
    current) ;;
    *) die "E2E_CLUSTER must be kind or current, not '$E2E_CLUSTER'" ;;
esac
[[ "$(uname -s)" == Linux ]] || die "VDUSE needs a Linux host kernel"

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root or sudo to run: $*"
    fi
}

# ---------------------------------------------------------------- cleanup
tmp="$(mktemp -d)"
created_cluster=0
applied_deploy=0
installed_snapshotter=0

diagnostics() {
    log "diagnostics"
    kubectl get nodes -o wide || true
    kubectl get pods,pvc -n "$TEST_NS" -o wide || true
    kubectl get pv,volumesnapshot,volumesnapshotcontent -A || true
    kubectl describe pods -n "$TEST_NS" || true
    kubectl get events -n "$TEST_NS" --sort-by=.lastTimestamp || true
    kubectl -n "$NS" get pods -o wide || true
    kubectl -n "$NS" describe pods || true
    local pod
    for pod in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
        kubectl -n "$NS" logs "$pod" --all-containers --prefix --tail=200 || true
    done
}

cleanup() {
    local rc=$?
    set +e
    if ((rc != 0)); then diagnostics; fi
    log "cleanup"
    # Volumes first, while the plugin still runs to delete them.
    kubectl delete namespace "$TEST_NS" --ignore-not-found --wait=true --timeout=180s
    if ((applied_deploy)); then
        kubectl delete -f deploy/ --ignore-not-found --wait=true --timeout=120s
    fi
    if ((installed_snapshotter)); then
        kubectl delete clusterrolebinding vduse-e2e-snapshot-controller-nodes --ignore-not-found
        kubectl delete clusterrole vduse-e2e-snapshot-controller-nodes --ignore-not-found
    fi
    if ((created_cluster)) && [[ "$KEEP_CLUSTER" != 1 ]]; then
        kind delete cluster --name "$CLUSTER_NAME"
    fi
    rm -rf "$tmp"
    if ((rc == 0)); then log "PASS"; else log "FAIL (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- host kernel
log "loading kernel modules on the host"
as_root modprobe -a vduse vdpa virtio_vdpa virtio_blk \
    || die "the host kernel $(uname -r) cannot load vduse/vdpa/virtio_vdpa/virtio_blk (VDUSE needs CONFIG_VDPA_USER)"
if [[ -d /sys/module/vhost_vdpa ]]; then
    as_root modprobe -r vhost_vdpa || warn "vhost_vdpa is loaded and in use: new vDPA devices may bind to it instead of virtio_vdpa"
fi
[[ -c /dev/vduse/control ]] || die "/dev/vduse/control is missing on the host"
if command -v genl >/dev/null 2>&1 && ! genl ctrl list 2>/dev/null | grep -qw vdpa; then
    die "the vdpa netlink family is not registered on the host (is the vdpa module loaded?)"
fi

# ---------------------------------------------------------------- cluster
if [[ "$E2E_CLUSTER" == kind ]]; then
    log "creating kind cluster $CLUSTER_NAME"
    cat >"$tmp/kind.yaml" <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      # The host's devtmpfs: device nodes created after the node started
      # (/dev/vduse/<name>, /dev/vdX) appear here, unlike in the node's /dev.
      - hostPath: /dev
        containerPath: /host-dev
EOF
    kind_args=(create cluster --name "$CLUSTER_NAME" --config "$tmp/kind.yaml" --wait 120s)
    [[ -n "$KIND_NODE_IMAGE" ]] && kind_args+=(--image "$KIND_NODE_IMAGE")
    kind "${kind_args[@]}"
    created_cluster=1
    kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null
    node="${CLUSTER_NAME}-control-plane"

    if docker exec "$node" sh -c 'command -v genl' >/dev/null 2>&1; then
        if ! docker exec "$node" genl ctrl list 2>/dev/null | grep -qw vdpa; then
            msg="the vdpa netlink family is not visible in the kind node's network namespace (it exists only in the host's initial one), so the plugin cannot attach VDUSE devices there. Run with E2E_CLUSTER=current against a cluster whose nodes use the host's network namespace, or set E2E_IGNORE_NETNS=1 to go on anyway."
            if [[ "$E2E_IGNORE_NETNS" == 1 ]]; then warn "$msg"; else die "$msg"; fi
        fi
    else
        warn "cannot check whether the kind node sees the vdpa netlink family (no genl in the node image); staging volumes fails if it does not"
    fi

    log "building $IMAGE"
    docker build -t "$IMAGE" "$root"
    kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"
fi

# ---------------------------------------------------------------- snapshots
if kubectl get crd volumesnapshots.snapshot.storage.k8s.io >/dev/null 2>&1 \
    && kubectl -n kube-system get deployment snapshot-controller >/dev/null 2>&1; then
    log "snapshot CRDs and controller already installed"
    kubectl -n kube-system get deployment snapshot-controller \
        -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q enable-distributed-snapshotting \
        || warn "the snapshot-controller lacks --enable-distributed-snapshotting: snapshots will not be taken"
else
    log "installing external-snapshotter $SNAPSHOTTER_VERSION CRDs and snapshot-controller"
    for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
        kubectl apply -f "$snap_raw/client/config/crd/snapshot.storage.k8s.io_${crd}.yaml"
    done
    kubectl wait --for=condition=Established --timeout=60s \
        crd/volumesnapshotclasses.snapshot.storage.k8s.io \
        crd/volumesnapshotcontents.snapshot.storage.k8s.io \
        crd/volumesnapshots.snapshot.storage.k8s.io
    kubectl -n kube-system apply -f "$snap_raw/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
    kubectl -n kube-system apply -f "$snap_raw/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml"
    installed_snapshotter=1
    # Distributed snapshotting: the controller labels each
    # VolumeSnapshotContent with the node of its volume, so that only that
    # node's csi-snapshotter (--node-deployment) takes the snapshot. It reads
    # Nodes for that.
    kubectl apply -f - <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: vduse-e2e-snapshot-controller-nodes
rules:
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: vduse-e2e-snapshot-controller-nodes
subjects:
  - kind: ServiceAccount
    name: snapshot-controller
    namespace: kube-system
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: vduse-e2e-snapshot-controller-nodes
EOF
    kubectl -n kube-system patch deployment snapshot-controller --type=json \
        -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--enable-distributed-snapshotting"}]'
    kubectl -n kube-system rollout status deployment/snapshot-controller --timeout=180s
fi

# ---------------------------------------------------------------- deploy/
log "applying deploy/ (plugin image $IMAGE)"
applied_deploy=1
for f in deploy/*.yaml; do
    if [[ "$f" == deploy/10-node-daemonset.yaml ]]; then
        kubectl set image --local -o yaml -f "$f" "vduse-csi=$IMAGE" "load-modules=$IMAGE" >"$tmp/ds.yaml"
        if [[ "$E2E_CLUSTER" == kind ]]; then
            kubectl patch --local -o yaml -f "$tmp/ds.yaml" --type=strategic \
                -p '{"spec":{"template":{"spec":{"volumes":[{"name":"dev","hostPath":{"path":"/host-dev","type":"Directory"}}]}}}}' \
                >"$tmp/ds-kind.yaml"
            mv "$tmp/ds-kind.yaml" "$tmp/ds.yaml"
        fi
        kubectl apply -f "$tmp/ds.yaml"
    else
        kubectl apply -f "$f"
    fi
done

log "waiting for the node plugin"
deadline=$((SECONDS + 300))
while :; do
    desired="$(kubectl -n "$NS" get ds vduse-csi-node -o jsonpath='{.status.desiredNumberScheduled}')"
    ready="$(kubectl -n "$NS" get ds vduse-csi-node -o jsonpath='{.status.numberReady}')"
    if [[ -n "$desired" && "$desired" -gt 0 && "${ready:-0}" -eq "$desired" ]]; then break; fi
    ((SECONDS < deadline)) || die "node plugin not ready ($ready/$desired)"
    sleep 5
done
deadline=$((SECONDS + 120))
until kubectl get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | grep -qw "$DRIVER"; do
    ((SECONDS < deadline)) || die "$DRIVER never registered with kubelet (CSINode)"
    sleep 3
done
deadline=$((SECONDS + 180))
until [[ -n "$(kubectl -n "$NS" get csistoragecapacities -o name 2>/dev/null)" ]]; do
    ((SECONDS < deadline)) || die "no CSIStorageCapacity objects published (GetCapacity)"
    sleep 5
done
kubectl -n "$NS" get csistoragecapacities

# ---------------------------------------------------------------- examples
kubectl create namespace "$TEST_NS"
k() { kubectl -n "$TEST_NS" "$@"; }

wait_verified() { # pod, expected log line
    k wait --for=condition=Ready "pod/$1" --timeout=300s
    k logs "$1" | grep -qx "$2" || die "pod $1 did not log '$2'"
    echo "$1: $2"
}

log "filesystem volume: write, read back"
k apply -f deploy/examples/pvc-pod.yaml
wait_verified vduse-demo "vduse-demo: data verified"
[[ "$(k exec vduse-demo -- cat /data/hello.txt)" == "hello from vduse-csi" ]] || die "unexpected /data/hello.txt"

log "filesystem volume: unstage and stage again in a new pod"
k delete pod vduse-demo --wait=true
k apply -f deploy/examples/pvc-pod.yaml
wait_verified vduse-demo "vduse-demo: data verified"
k logs vduse-demo | grep -q "wrote /data/hello.txt" && die "the data was gone: the new pod wrote it again"

log "expanding the PVC to 2Gi (online)"
k patch pvc vduse-demo --type=merge -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}'
k wait --for=jsonpath='{.status.capacity.storage}'=2Gi pvc/vduse-demo --timeout=300s
deadline=$((SECONDS + 180))
while :; do
    size_kib="$(k exec vduse-demo -- df -k /data | awk 'NR==2 {print $2}')"
    ((size_kib > 1800000)) && break
    ((SECONDS < deadline)) || die "filesystem not grown: ${size_kib} KiB"
    sleep 5
done
echo "filesystem size now ${size_kib} KiB"
k exec vduse-demo -- sha256sum -c /data/blob.sha256

log "snapshot and restore"
# The snapshot has the expanded size: the restored PVC must be as large.
sed 's/storage: 1Gi/storage: 2Gi/' deploy/examples/snapshot-restore.yaml | k apply -f -
k wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/vduse-demo-snap --timeout=300s
wait_verified vduse-demo-restore "vduse-demo-restore: data verified"

log "raw block volume"
k apply -f deploy/examples/block-pvc-pod.yaml
wait_verified vduse-block-demo "vduse-block-demo: data verified"

log "deleting the test volumes"
k delete pod --all --wait=true
k delete volumesnapshot --all --wait=true --timeout=180s
k delete pvc --all --wait=true --timeout=180s
deadline=$((SECONDS + 180))
while kubectl get pv -o jsonpath='{.items[*].spec.csi.driver}' | grep -qw "$DRIVER"; do
    ((SECONDS < deadline)) || die "PersistentVolumes of $DRIVER were not deleted"
    sleep 5
done
