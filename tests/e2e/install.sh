# shellcheck shell=bash
# The driver installed in the guest's cluster the way users install it (README "Install on
# Kubernetes"), sourced by guest-kubelet.sh: the VolumeSnapshot CRDs and the
# snapshot-controller, then `kubectl apply` of deploy/ and of deploy/rbd/, each through an
# overlay (kustomize, built into kubectl) that changes only what this cluster needs. README
# "The tested install" lists every difference; they are:
#   - image names: the sidecars are built here from their sources (tests/e2e/prepare.sh), at
#     the newest releases Debian's Go builds, older than the tags deploy/ names;
#   - overlay/node-daemonset.yaml: no storage capacity tracking (Kubernetes 1.20);
#   - overlay/rbd-controller.yaml: the node's network, one replica, metrics on another port;
#   - the RBD cluster's ConfigMap and Secret: this Ceph's monitor and its cephx user's key.
# The rendered manifests are kept in $OUT/<name>.yaml.

UPSTREAM=registry.k8s.io/sig-storage
# name:version of each sidecar image, as tests/e2e/prepare.sh built and tagged them.
SIDECARS=(csi-provisioner:v3.4.1 csi-node-driver-registrar:v2.7.0 csi-resizer:v1.7.0
    csi-snapshotter:v6.2.3 snapshot-controller:v6.2.3 livenessprobe:v2.9.0)
SIDECAR_IMAGES=()
for s in "${SIDECARS[@]}"; do SIDECAR_IMAGES+=("$CACHE/images/${s%%:*}.tar"); done
REPO=$(cd "$HERE/../.." && pwd)
NS=vduse-csi

# overlay NAME [PATCH...] -- FILE...: renders FILE... with the sidecars' image names and the
# strategic-merge PATCHes into $OUT/NAME.yaml.
overlay() {
    local name=$1 dir=$W/overlay/$1 patches=() f s
    shift
    while [[ $1 != -- ]]; do
        patches+=("$1")
        shift
    done
    shift
    rm -rf "$dir" && mkdir -p "$dir"
    {
        echo "resources:"
        for f in "$@"; do
            cp "$f" "$dir/" && echo "  - $(basename "$f")"
        done
        echo "images:"
        for s in "${SIDECARS[@]}"; do
            printf '  - name: %s\n    newName: %s\n    newTag: %s\n' \
                "$UPSTREAM/${s%%:*}" "registry.local/${s%%:*}" "${s#*:}"
        done
        if ((${#patches[@]})); then
            echo "patchesStrategicMerge:"
            for f in "${patches[@]}"; do
                cp "$f" "$dir/patch-$(basename "$f")" && echo "  - patch-$(basename "$f")"
            done
        fi
    } >"$dir/kustomization.yaml"
    kc kustomize "$dir" >"$OUT/$name.yaml"
}

# rbd_cluster_patch FILE: the ConfigMap of Ceph clusters and the Secret, filled in for this
# guest's Ceph: its one monitor and the `profile rbd` user that cluster.sh created.
rbd_cluster_patch() {
    cat >"$1" <<YAML
apiVersion: v1
kind: ConfigMap
metadata: {name: vduse-csi-ceph-clusters, namespace: $NS}
data:
  clusters.json: |
    [{"clusterID": "ceph", "monitors": ["127.0.0.1:6789"]}]
---
apiVersion: v1
kind: Secret
metadata: {name: vduse-csi-rbd-secret, namespace: $NS}
stringData:
  userID: kubernetes
  userKey: "$(cat "$CEPH/client.kubernetes.key")"
YAML
}

# ready SELECTOR: at least one pod in $NS matches, and every container of every such pod is
# ready.
ready() {
    local states
    states=$(kc -n "${2:-$NS}" get pods -l "$1" -o jsonpath='{range .items[*]}{.status.phase}:{range .status.containerStatuses[*]}{.ready} {end};{end}') || return 1
    [[ -n $states && $states != *false* && $states != *Pending* && $states == *true* ]]
}

# wait_ready SELECTOR [NAMESPACE]: waits up to 10 minutes (pods start slowly under TCG).
wait_ready() {
    local i
    for ((i = 0; i < 300; i++)); do
        ready "$@" && return 0
        sleep 2
    done
    say "pods $1 are not ready:"
    kc -n "${2:-$NS}" describe pods -l "$1" | tail -40
    return 1
}

# apply FILE: `kubectl apply -f FILE`, tried again (it is idempotent) while the API server
# refuses it, at most 5 times over about 45 s: under TCG a busy API server times requests
# out. The last refusal is said, so the run's output shows why the install stopped.
apply() {
    local i err
    for ((i = 1; i <= 5; i++)); do
        err=$(kc apply -f "$1" 2>&1 >/dev/null) && return 0
        sleep $((i * 3))
    done
    say "kubectl apply -f $1 failed 5 times; the last time: $(tr '\n' ' ' <<<"$err")"
    return 1
}

# served GROUP RESOURCE: the API server's discovery lists RESOURCE in GROUP. A CRD's
# Established condition comes before discovery serves its kinds, and `kubectl apply` of an
# object of a kind discovery does not list fails ("no matches for kind").
served() {
    kc api-resources --api-group="$1" -o name 2>/dev/null | grep -qx "$2.$1"
}

install_driver() {
    say "installing the snapshot CRDs and the snapshot-controller"
    apply "$CACHE/crds/" || return 1
    kc wait --for condition=established --timeout=120s crd/volumesnapshots.snapshot.storage.k8s.io \
        crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io ||
        { say "the snapshot CRDs were not established in 120 s"; return 1; }
    wait_for 120 "discovery to serve the snapshot kinds" served snapshot.storage.k8s.io volumesnapshotclasses ||
        return 1
    overlay snapshot-controller -- "$CACHE/snapshot-controller-rbac.yaml" "$HERE/overlay/snapshot-controller.yaml" ||
        { say "kubectl kustomize of the snapshot-controller failed"; return 1; }
    apply "$OUT/snapshot-controller.yaml" || return 1

    say "kubectl apply -f deploy/ and deploy/rbd/ (through the test overlay)"
    overlay deploy "$HERE/overlay/node-daemonset.yaml" -- "$REPO"/deploy/*.yaml ||
        { say "kubectl kustomize of deploy/ failed"; return 1; }
    rbd_cluster_patch "$W/rbd-cluster.yaml"
    overlay deploy-rbd "$HERE/overlay/rbd-controller.yaml" "$W/rbd-cluster.yaml" -- "$REPO"/deploy/rbd/*.yaml ||
        { say "kubectl kustomize of deploy/rbd/ failed"; return 1; }
    apply "$OUT/deploy.yaml" || return 1
    apply "$OUT/deploy-rbd.yaml" || return 1
    installed
}

# installed: the node plugin's pod, the RBD controller and the snapshot-controller all ready.
installed() {
    wait_ready app.kubernetes.io/component=node || return 1
    say "node plugin pod ready"
    wait_ready app.kubernetes.io/component=rbd-controller || return 1
    wait_ready app=snapshot-controller kube-system || return 1
    say "RBD controller and snapshot-controller ready"
}

# uninstall FILE...: deletes what the rendered manifests FILE... created and waits until the
# driver's pods and namespace are gone.
uninstall() {
    local i files=() f
    for f in "$@"; do files+=(-f "$f"); done
    kc delete --wait=false --ignore-not-found "${files[@]}" >/dev/null
    for ((i = 0; i < 300; i++)); do
        kc get namespace $NS >/dev/null 2>&1 || return 0
        sleep 2
    done
    say "namespace $NS is still there: $(kc -n $NS get all 2>&1 | tr '\n' ' ')"
    return 1
}

# plugin_pid: the node plugin's process on this node (the container's PID 1).
plugin_pid() {
    pgrep -f '^/usr/local/bin/vduse-csi serve --endpoint=unix:///csi/csi.sock' | head -n1
}
