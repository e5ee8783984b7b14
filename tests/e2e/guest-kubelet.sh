#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by tests/e2e/run.sh): a one-node Kubernetes 1.20
# control plane and kubelet bound to loopback, a one-node Ceph with cephx, the driver
# installed the way users install it (tests/e2e/install.sh: our image, the CSI sidecars,
# `kubectl apply` of deploy/ and deploy/rbd/ through a test overlay), and the scenarios driven
# through kubectl only. Each scenario prints "RESULT name PASS|FAIL" to
# $GUEST_OUT_DIR/results and logs to NAME.log. Everything it starts it stops.
# shellcheck source-path=SCRIPTDIR
set -uo pipefail

BIN=${VDUSE_CSI_BIN:?}
CACHE=${VDUSE_CSI_E2E_CACHE:?}
PLUGIN_IMAGE=${VDUSE_CSI_IMAGE:?}
CHART_RBD=${VDUSE_CSI_CHART_RBD:?}
OUT=${GUEST_OUT_DIR:?}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODE=e2e-node
DRIVER=vduse.csi.dev
RBD_DRIVER=rbd.vduse.csi.dev
W=/tmp/e2e
CEPH=/tmp/e2e/ceph
# Pods reach the API server as in-cluster clients do: at the `kubernetes` Service's address
# (the first of --service-cluster-ip-range) on port 443. With no kube-proxy here, that address
# is put on loopback and the API server listens there itself.
SERVICE_IP=10.0.0.1
K=$CACHE/bin
export KUBECONFIG=$W/kubeconfig
PIDS=()
: >"$OUT/results"
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd

say() { echo "e2e $(cut -d' ' -f1 /proc/uptime)s: $*"; }
kc() { "$K/kubectl" --request-timeout=60s "$@"; }
start() { # NAME CMD...: runs CMD in the background, logging to $OUT/NAME.daemon.log
    local name=$1
    shift
    "$@" >"$OUT/$name.daemon.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$name=$!"
}
wait_for() { # SECONDS DESCRIPTION CMD...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    say "timed out after ${secs}s waiting for $what"
    return 1
}
# cpu_record NAME: the guest's busiest processes so far (CPU seconds, their age, the command),
# into OUT/cpu-NAME.txt: under TCG every CPU second counts, so this is where the run's time goes.
cpu_record() {
    {
        echo "guest uptime $(cut -d' ' -f1 /proc/uptime) s; CPU seconds (user+system) of each vCPU:"
        awk '$1 ~ /^cpu[0-9]+$/ { printf "  %s busy %.0f idle %.0f\n", $1, ($2 + $3 + $4 + $7 + $8) / 100, ($5 + $6) / 100 }' /proc/stat
        ps -eo cputimes,etimes,args --sort=-cputimes | cut -c1-160 | head -n 30
    } >"$OUT/cpu-$1.txt" 2>&1
}
stop_all() {
    say "stopping everything"
    cpu_record end
    # The containers' logs (the plugin's, the sidecars', the test pods') for the record.
    kc get pods -A -o wide >"$OUT/pods.txt" 2>&1
    cp -r /var/log/pods "$OUT/pods" 2>/dev/null
    kc delete pods --all --grace-period=1 --wait=false >/dev/null 2>&1
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
    sleep 3
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -KILL "${PIDS[i]}" 2>/dev/null; done
    pkill -KILL -f containerd-shim 2>/dev/null
    pkill -KILL -f vduse-csi 2>/dev/null
    "$HERE/../ceph/cluster.sh" stop "$CEPH" 2>/dev/null
    grep -o ' /var/lib/kubelet[^ ]*' /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
}
trap stop_all EXIT
# shellcheck source=install.sh
source "$HERE/install.sh"

# --- the node: cgroups, writable /var/lib and /var/log (kubelet hard-codes paths there) -----
mkdir -p $W /sys/fs/cgroup
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
echo "+cpu +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
# Room for containerd's images (overlayfs snapshots: a container's root is a layer over
# them, not a copy).
mount -t tmpfs -o size=4g tmpfs /var/lib
mount -t tmpfs tmpfs /var/log
# The plugin's mounts reach kubelet and the pods through Bidirectional mount propagation,
# which needs the host's mounts shared (systemd does this on a real node).
mount --make-rshared /
mkdir -p /var/lib/kubelet/plugins_registry /run/containerd $W/cni $W/certs
ip addr add $SERVICE_IP/32 dev lo

# --- control plane ---------------------------------------------------------------------------
say "starting etcd"
start etcd etcd --name e2e --data-dir /var/lib/etcd --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster e2e=http://127.0.0.1:2380
openssl genrsa -out $W/certs/sa.key 2048 2>/dev/null
openssl rsa -in $W/certs/sa.key -pubout -out $W/certs/sa.pub 2>/dev/null
TOKEN=e2e-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN,admin,admin,system:masters" >$W/tokens.csv
cat >$KUBECONFIG <<KC
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://127.0.0.1:443", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$TOKEN"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin}}]
current-context: e2e
KC
say "starting kube-apiserver"
# The sidecars are in-cluster clients: service account tokens (the ServiceAccount admission
# plugin and the token controller) and the API server's self-signed certificate, which names
# the Service's address, as their CA.
start apiserver "$K/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 \
    --advertise-address=127.0.0.1 --secure-port=443 --insecure-port=0 --cert-dir=$W/certs \
    --token-auth-file=$W/tokens.csv --authorization-mode=AlwaysAllow \
    --service-account-key-file=$W/certs/sa.pub --service-account-signing-key-file=$W/certs/sa.key \
    --service-account-issuer=https://127.0.0.1:443 --service-cluster-ip-range=10.0.0.0/24 \
    --allow-privileged=true
wait_for 300 "kube-apiserver" kc get --raw /readyz || exit 1
say "kube-apiserver ready"
# The controllers the driver and the scenarios need, and no more: under TCG every periodic
# sync costs (the quota controller's API discovery every 30 s, the autoscaler's, the jobs'
# polls). Kept: service accounts and their tokens, namespaces and the garbage collector (an
# uninstall), DaemonSets, Deployments and ReplicaSets, the PV binder, attach/detach,
# expansion and the PV/PVC protections, node lifecycle, RBAC aggregation.
CONTROLLERS='*,-nodeipam,-route,-service,-cloud-node-lifecycle,-horizontalpodautoscaling,-cronjob,-job'
CONTROLLERS+=',-resourcequota,-disruption,-statefulset,-replicationcontroller,-ttl,-ttl-after-finished'
CONTROLLERS+=',-csrsigning,-csrapproving,-csrcleaner,-endpoint,-endpointslice,-endpointslicemirroring,-podgc'
start controller_manager "$K/kube-controller-manager" --kubeconfig=$KUBECONFIG --bind-address=127.0.0.1 \
    --controllers="$CONTROLLERS" \
    --service-account-private-key-file=$W/certs/sa.key --root-ca-file=$W/certs/apiserver.crt \
    --leader-elect=false --use-service-account-credentials=false
# DaemonSet pods and WaitForFirstConsumer claims need the scheduler.
start scheduler "$K/kube-scheduler" --kubeconfig=$KUBECONFIG --bind-address=127.0.0.1 --leader-elect=false

# --- container runtime: containerd with the overlayfs snapshotter, images from host files ----
cat >$W/cni/10-lo.conflist <<'CNI'
{"cniVersion": "0.4.0", "name": "lo", "plugins": [{"type": "loopback"}]}
CNI
cat >$W/containerd.toml <<TOML
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.local/pause:e2e"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$W/cni"
TOML
say "starting containerd"
start containerd containerd --config $W/containerd.toml
wait_for 60 "containerd" ctr --address /run/containerd/containerd.sock version || exit 1
# The pause image now (kubelet needs it); our image (built by tests/e2e/install-images.sh from
# the Dockerfile), the sidecars' and the test pods' images in the background while kubelet and
# Ceph start, since importing them is most of a minute under TCG.
import_images() {
    local image
    for image in "$@"; do
        ctr --address /run/containerd/containerd.sock -n k8s.io images import --snapshotter overlayfs \
            "$image" >/dev/null || { say "cannot import $image"; return 1; }
    done
}
import_images "$CACHE/images/pause.tar" || exit 1
import_images "$CACHE/images/e2e.tar" "$PLUGIN_IMAGE" "${SIDECAR_IMAGES[@]}" &
IMPORT_PID=$!

# --- kubelet -----------------------------------------------------------------------------------
say "starting kubelet"
# --sync-frequency: kubelet resyncs each pod, and so finds a grown claim to expand on the node,
# every 15 s rather than every minute.
start kubelet "$K/kubelet" --kubeconfig=$KUBECONFIG --container-runtime=remote \
    --container-runtime-endpoint=unix:///run/containerd/containerd.sock --cgroup-driver=cgroupfs \
    --fail-swap-on=false --node-ip=127.0.0.1 --address=127.0.0.1 --hostname-override=$NODE \
    --root-dir=/var/lib/kubelet --pod-infra-container-image=registry.local/pause:e2e \
    --read-only-port=0 --cgroups-per-qos=false --enforce-node-allocatable= \
    --eviction-hard='memory.available<1Mi,nodefs.available<1%,imagefs.available<1%' \
    --image-gc-high-threshold=100 --volume-stats-agg-period=5s --sync-frequency=15s --v=2
wait_for 400 "node Ready" sh -c "'$K/kubectl' get node $NODE -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True" || exit 1
say "node Ready"
# kubelet 1.20 will not report a loopback address as the node's ("nodeIP can't be loopback
# address") and leaves the node without addresses, so the apiserver could not reach it for
# `kubectl logs` or the node proxy. Declare the address by hand in the node's status: kubelet's
# address setter fails before it touches the field, so the value stays. Only the IP: the
# apiserver would try a Hostname address first, and the name resolves nowhere here.
curl -sfk -X PATCH -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/merge-patch+json' \
    -d '{"status":{"addresses":[{"type":"InternalIP","address":"127.0.0.1"}]}}' \
    "https://127.0.0.1:443/api/v1/nodes/$NODE/status" >/dev/null || exit 1
say "node address declared: $(kc get node $NODE -o jsonpath='{.status.addresses}')"

# --- Ceph with cephx, then the driver as users install it ----------------------------------
say "starting Ceph (cephx)"
# No ceph-mgr: the driver and librbd never call it (clones are flattened by librbd itself, no
# rbd_support task), and under TCG its Python modules took a quarter of a vCPU all along.
CEPH_AUTH=cephx CEPH_MGR=0 "$HERE/../ceph/cluster.sh" start "$CEPH" >"$OUT/ceph.log" 2>&1 || { cat "$OUT/ceph.log"; exit 1; }
say "Ceph up"
wait "$IMPORT_PID" || exit 1
say "images imported: $(ctr --address /run/containerd/containerd.sock -n k8s.io images ls -q | grep -v '^sha256' | tr '\n' ' ')"
install_driver || exit 1
cpu_record setup

# --- scenarios ---------------------------------------------------------------------------------
# shellcheck source=scenarios.sh
source "$HERE/scenarios.sh"
run_scenarios
