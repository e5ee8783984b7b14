# shellcheck shell=bash
# The kubelet end-to-end scenarios, sourced by guest-kubelet.sh once the driver is installed
# (tests/e2e/install.sh). Each runs through kubectl only: claims, snapshots and pods; no CSI
# call comes from the test. They run in the order of SCENARIOS at the end.

# watch_until SECONDS PATTERN GET-ARGS...: follows `kubectl get --watch GET-ARGS` and prints
# the first line that matches PATTERN (an extended regular expression); fails if none comes
# within SECONDS. One kubectl and one watch per wait, where a poll would start a kubectl (a Go
# start and a TLS handshake with the API server, costly under TCG) every second; and it sees
# a change at once.
watch_until() {
    local secs=$1 pattern=$2 line fd pid status=1
    shift 2
    exec {fd}< <(exec timeout "$secs" "$K/kubectl" get --watch "$@" 2>/dev/null)
    pid=$!
    while read -r -u "$fd" line; do
        if [[ $line =~ $pattern ]]; then
            echo "$line"
            status=0
            break
        fi
    done
    kill "$pid" 2>/dev/null
    exec {fd}<&-
    return $status
}

# claim NAME SIZE CLASS MODE [SOURCE]: a PVC of the StorageClass CLASS, restored from the
# VolumeSnapshot SOURCE if given.
claim() {
    local source=""
    [[ -n ${5:-} ]] && source="dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: $5}"
    kc apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $3
  volumeMode: $4
  resources: {requests: {storage: $2}}
  $source
YAML
}

# snapshot NAME CLAIM CLASS: a VolumeSnapshot of CLAIM; waits until it is ready to use.
snapshot() {
    kc apply -f - <<YAML || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $1}
spec:
  volumeSnapshotClassName: $3
  source: {persistentVolumeClaimName: $2}
YAML
    watch_until 300 '^true$' volumesnapshot "$1" -o jsonpath='{.status.readyToUse}{"\n"}' >/dev/null && return 0
    kc describe volumesnapshot "$1"
    return 1
}

# pod NAME CLAIM MODE SCRIPT [READ_ONLY]: a pod running SCRIPT with the claim at
# /data (Filesystem) or /dev/xvda (Block), read-only if READ_ONLY is "true".
pod() {
    local name=$1 claim=$2 mode=$3 script=$4 read_only=${5:-false} attach
    if [[ $mode == Block ]]; then
        attach="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
    else
        attach="volumeMounts: [{name: v, mountPath: /data}]"
    fi
    pod_with "$name" "$attach" "{name: v, persistentVolumeClaim: {claimName: $claim, readOnly: $read_only}}" "$script"
}

# pod_with NAME ATTACH VOLUME SCRIPT: a pod running SCRIPT, with the volume VOLUME (a pod-spec
# volume, in YAML flow style) attached as ATTACH says. The scheduler places it (there is one
# node), which is what binds a WaitForFirstConsumer claim.
pod_with() {
    kc apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  hostNetwork: true
  automountServiceAccountToken: false
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: registry.local/e2e:busybox
    imagePullPolicy: Never
    command: [/bin/sh, -c, '$4']
    securityContext: {privileged: true}
    $2
  volumes: [$3]
YAML
}

# finished NAME: waits until the pod has run to its end; true if it succeeded.
finished() {
    local phase dump
    # A pod still not done after a minute: what every process waits on, for the log. (Its
    # output goes elsewhere: a caller's $(...) must not wait for this watcher.)
    (sleep 60 && ps -eo pid,ppid,stat,wchan:30,args >"$OUT/ps-$1.log") >/dev/null 2>&1 &
    dump=$!
    phase=$(watch_until 600 '^(Succeeded|Failed)$' pod "$1" -o jsonpath='{.status.phase}{"\n"}')
    kill "$dump" 2>/dev/null
    [[ $phase == Succeeded ]] && return 0
    kc describe pod "$1"
    return 1
}

# podlog NAME: what the pod's container printed. Read from kubelet's log files on this node:
# `kubectl logs` needs a node address other than loopback, which this cluster does not have.
podlog() {
    local uid
    uid=$(kc get pod "$1" -o jsonpath='{.metadata.uid}') || return 1
    cat /var/log/pods/default_"$1"_"$uid"/c/*.log | cut -d' ' -f4-
}

gone() { # NAME: deletes the pod and waits until it is gone
    kc delete pod "$1" --wait=true --timeout=300s
}

# unstaged PV [DEVICE]: kubelet unstaged the volume: no staging mount of the PV is left, nor
# the VDUSE device DEVICE (by default the PV's name, which node-local volumes' devices carry).
unstaged() {
    local i device=${2:-$1}
    for ((i = 0; i < 120; i++)); do
        if [[ ! -e /sys/class/vduse/$device ]] && ! grep -q "/$1/globalmount" /proc/mounts; then
            return 0
        fi
        sleep 1
    done
    echo "volume $1 is still staged: $(ls /sys/class/vduse) / $(grep "$1" /proc/mounts)"
    return 1
}

# bound CLAIM: waits until the claim is bound (for WaitForFirstConsumer, after its first pod
# was scheduled), and prints its PV's name.
bound() {
    local line
    if line=$(watch_until 300 '^Bound .' pvc "$1" -o jsonpath='{.status.phase} {.spec.volumeName}{"\n"}'); then
        echo "${line#Bound }"
        return 0
    fi
    kc describe pvc "$1" >&2
    return 1
}

# registrar_logs POD UID: the restart counts of the node pod's containers, and every run of its
# registrars (kubelet keeps the log of each restart), for the verdict's log.
registrar_logs() {
    local f
    kc -n $NS get pod "$1" -o jsonpath='{range .status.containerStatuses[*]}{.name}: restarts={.restartCount} last={.lastState.terminated.reason}/{.lastState.terminated.exitCode}{"\n"}{end}'
    for f in /var/log/pods/${NS}_"$1"_"$2"/node-driver-registrar*/*.log; do
        echo "--- $f"
        cut -d' ' -f4- "$f" | tail -n 20
    done
}

# The driver as `kubectl apply` installed it: the node plugin's pod Running with every
# container ready, both drivers registered with kubelet by node-driver-registrar (the plugin
# does not register itself: no --kubelet-registration-dir), livenessprobe answering, the RBD
# controller and the snapshot-controller running.
scenario_installed_with_kubectl_apply() {
    local pod uid containers
    pod=$(kc -n $NS get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}') || return 1
    uid=$(kc -n $NS get pod "$pod" -o jsonpath='{.metadata.uid}')
    kc -n $NS get pods -o wide
    containers=$(kc -n $NS get pod "$pod" -o jsonpath='{range .status.containerStatuses[*]}{.name}={.ready} {end}')
    echo "node pod $pod: $containers"
    registrar_logs "$pod" "$uid"
    [[ $(kc -n $NS get pod "$pod" -o jsonpath='{.status.phase}') == Running ]] || return 1
    [[ $containers != *=false* && $(wc -w <<<"$containers") -eq 7 ]] || return 1
    # Ready without a restart: a registrar whose one call timed out exits and is restarted (why
    # deploy/ gives it --timeout=30s), and a plugin that crashed would be restarted too.
    local restarts c
    restarts=$(kc -n $NS get pod "$pod" -o jsonpath='{range .status.containerStatuses[*]}{.name}={.restartCount} {end}')
    for c in vduse-csi node-driver-registrar node-driver-registrar-rbd; do
        [[ " $restarts" == *" $c=0 "* ]] || return 1
    done
    kc get csinode "$NODE" -o jsonpath='{.spec.drivers[*].name}{"\n"}'
    kc get csinode "$NODE" -o jsonpath='{.spec.drivers[*].name}' | grep -qw "$DRIVER" || return 1
    kc get csinode "$NODE" -o jsonpath='{.spec.drivers[*].name}' | grep -qw "$RBD_DRIVER" || return 1
    ls /var/lib/kubelet/plugins_registry
    [[ -S /var/lib/kubelet/plugins_registry/$DRIVER-reg.sock && -S /var/lib/kubelet/plugins_registry/$RBD_DRIVER-reg.sock ]] ||
        return 1
    grep -h "PluginRegistered:true" /var/log/pods/${NS}_${pod}_${uid}/node-driver-registrar*/*.log || return 1
    if kc -n $NS get pod "$pod" -o jsonpath='{.spec.containers[0].args}' | grep -q kubelet-registration-dir; then
        echo "the plugin registers itself"
        return 1
    fi
    local health
    health=$(curl -sf http://127.0.0.1:9860/healthz) || return 1
    echo "livenessprobe: $health"
    [[ $health == ok ]] || return 1
    kc -n $NS get deployment vduse-csi-rbd-controller
    [[ $(kc -n $NS get deployment vduse-csi-rbd-controller -o jsonpath='{.status.availableReplicas}') == 1 ]] || return 1
    kc get storageclass -o name
    kc get volumesnapshotclass -o name
}

# A claim on vduse-ext4 (WaitForFirstConsumer) and a pod: the node's provisioner creates the
# volume when the pod is scheduled, the pod writes, a new pod reads it back; after the last
# pod the device and the staging mount are gone.
scenario_pod_writes_and_a_new_pod_reads_back() {
    local pv
    claim data 64Mi vduse-ext4 Filesystem || return 1
    [[ $(kc get pvc data -o jsonpath='{.status.phase}') == Pending ]] || return 1
    pod writer data Filesystem 'echo written-by-the-first-pod > /data/file && sync && cat /data/file' || return 1
    pv=$(bound data) || return 1
    echo "provisioned $pv on $(kc get pv "$pv" -o jsonpath='{.spec.nodeAffinity.required}')"
    finished writer || return 1
    [[ $(podlog writer) == written-by-the-first-pod ]] || return 1
    gone writer || return 1
    pod reader data Filesystem 'cat /data/file' || return 1
    finished reader || return 1
    local read
    read=$(podlog reader)
    echo "read back: $read"
    [[ $read == written-by-the-first-pod ]] || return 1
    gone reader || return 1
    unstaged "$pv"
}

# A volumeMode: Block claim: the pod writes the device and reads the bytes back.
scenario_block_claim_is_a_device_in_the_pod() {
    local pv
    claim raw 32Mi vduse-block Block || return 1
    pod block raw Block 'echo block-data-e2e | dd of=/dev/xvda bs=512 conv=sync,fsync 2>/dev/null && dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -c 14' || return 1
    pv=$(bound raw) || return 1
    finished block || return 1
    [[ $(podlog block) == block-data-e2e ]] || return 1
    gone block || return 1
    unstaged "$pv"
}

running() { # NAME: waits until the pod runs; fails at once if it ended instead
    local phase
    phase=$(watch_until 600 '^(Running|Succeeded|Failed)$' pod "$1" -o jsonpath='{.status.phase}{"\n"}')
    case $phase in
    Running) return 0 ;;
    Succeeded | Failed) echo "pod $1 ended ($phase) instead of running: $(podlog "$1" | tr '\n' ';')" ;;
    esac
    kc describe pod "$1"
    return 1
}

# The plugin's container is killed (SIGKILL) while a pod writes files in a loop: kubelet
# restarts it, the writes stall and resume, the pod sees no error, every file's checksum holds,
# and the kernel logs no I/O error.
scenario_plugin_container_killed_while_a_pod_writes() {
    local pv pid restarts
    claim looped 128Mi vduse-ext4 Filesystem || return 1
    pod looper looped Filesystem 'i=0; while [ $i -lt 400 ]; do dd if=/dev/urandom of=/data/f$i bs=4k count=16 2>/dev/null || exit 1; md5sum /data/f$i >>/data/sums || exit 1; i=$((i+1)); done; sync; echo wrote $i files' || return 1
    running looper || return 1
    pv=$(bound looped) || return 1
    sleep 3
    pid=$(plugin_pid)
    [[ -n $pid ]] || return 1
    say "killing the plugin container's process (pid $pid) while the pod writes"
    kill -KILL "$pid"
    finished looper || return 1
    podlog looper
    [[ $(podlog looper) == "wrote 400 files" ]] || return 1
    restarts=$(kc -n $NS get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].status.containerStatuses[?(@.name=="vduse-csi")].restartCount}')
    echo "plugin container restarts: $restarts; new process: $(plugin_pid)"
    ((restarts >= 1)) || return 1
    wait_ready app.kubernetes.io/component=node || return 1
    gone looper || return 1
    pod checker looped Filesystem 'md5sum -c /data/sums | grep -vc ": OK$"; wc -l < /data/sums' || return 1
    finished checker || return 1
    echo "checker: $(podlog checker | tr '\n' ' ')"
    [[ $(podlog checker | tr '\n' ' ') == "0 400 " ]] || return 1
    gone checker || return 1
    if dmesg | grep -iE "I/O error|blk_update_request" | grep -v loop; then return 1; fi
    unstaged "$pv"
}

# A pod with a read-only claim gets EROFS; two pods on one RWO volume on this node both work.
scenario_read_only_claim_and_two_pods_on_one_volume() {
    local id=shared
    claim $id 64Mi vduse-ext4 Filesystem || return 1
    pod first $id Filesystem 'echo from-first > /data/first && sync && sleep 600' || return 1
    running first || return 1
    pod second $id Filesystem 'sleep 2; cat /data/first && echo from-second > /data/second && sync' || return 1
    finished second || return 1
    [[ $(podlog second) == from-first ]] || return 1
    pod reader $id Filesystem 'cat /data/second; touch /data/nope 2>&1 | grep -o "Read-only file system"' true || return 1
    finished reader || return 1
    echo "read-only pod: $(podlog reader | tr '\n' ' ')"
    [[ $(podlog reader | tr '\n' ' ') == "from-second Read-only file system " ]] || return 1
    # While the first pod still runs: kubelet's volume stats for it, through the apiserver's
    # node proxy. kubelet measures volumes in the background (--volume-stats-agg-period), so
    # the first summaries after a pod starts may not list the volume yet: ask until they do.
    local i
    for ((i = 0; i < 60; i++)); do
        kc get --raw "/api/v1/nodes/$NODE/proxy/stats/summary" >"$OUT/stats-summary.json" || return 1
        python3 - "$OUT/stats-summary.json" $id >"$OUT/stats.out" 2>&1 <<'PY' && break
import json, sys
summary, claim = json.load(open(sys.argv[1])), sys.argv[2]
vols = [v for p in summary["pods"] if p["podRef"]["name"] == "first" for v in p.get("volume", [])
        if v.get("pvcRef", {}).get("name") == claim]
print("kubelet volume stats:", vols)
assert vols and vols[0]["capacityBytes"] > 50 << 20 and vols[0]["usedBytes"] > 0, vols
PY
        sleep 2
    done
    cat "$OUT/stats.out"
    ((i < 60)) || return 1
    local pv
    pv=$(kc get pvc $id -o jsonpath='{.spec.volumeName}')
    for p in first second reader; do gone $p || return 1; done
    unstaged "$pv"
}

# Expansion by editing the claim: csi-resizer takes the new size, kubelet calls
# NodeExpandVolume while the pod runs, and df in the pod shows the new size.
scenario_expansion_by_editing_the_claim_reaches_the_pod() {
    local pv before after i mount
    claim grown 64Mi vduse-ext4 Filesystem || return 1
    pod grower grown Filesystem 'df -k /data | tail -1; while [ ! -e /data/stop ]; do df -k /data | tail -1 > /data/df; sleep 1; done' || return 1
    running grower || return 1
    pv=$(bound grown) || return 1
    sleep 3
    before=$(awk '{print $2}' < <(podlog grower | tail -1))
    kc patch pvc grown -p '{"spec":{"resources":{"requests":{"storage":"256Mi"}}}}' || return 1
    watch_until 300 '^256Mi$' pvc grown -o jsonpath='{.status.capacity.storage}{"\n"}' >/dev/null
    kc get pvc grown -o jsonpath='{.status.capacity.storage} {.status.conditions}{"\n"}'
    grep -h "NodeExpandVolume" "$OUT/kubelet.daemon.log" | tail -2
    mount=$(ls -d /var/lib/kubelet/pods/*/volumes/kubernetes.io~csi/"$pv"/mount)
    for ((i = 0; i < 30; i++)); do
        after=$(awk '{print $2}' "$mount/df")
        ((after > 3 * before)) && break
        sleep 1
    done
    echo "df in the pod: $before KiB before, $after KiB after"
    touch "$mount/stop"
    finished grower || return 1
    gone grower || return 1
    ((after > 3 * before)) || return 1
    unstaged "$pv"
}

# A VolumeSnapshot of a claim and a claim restored from it: the restored volume holds the
# same data as the source had when the snapshot was taken, not what was written after it.
scenario_snapshot_restores_equal_data() {
    local sum restored
    claim origin 64Mi vduse-ext4 Filesystem || return 1
    pod origin-writer origin Filesystem 'dd if=/dev/urandom of=/data/blob bs=64k count=32 2>/dev/null && sync && md5sum < /data/blob' || return 1
    bound origin >/dev/null || return 1
    finished origin-writer || return 1
    sum=$(podlog origin-writer)
    gone origin-writer || return 1
    snapshot origin-snap origin vduse-snapclass || return 1
    kc get volumesnapshotcontent -o wide
    pod origin-later origin Filesystem 'echo after-the-snapshot > /data/blob && sync' || return 1
    finished origin-later || return 1
    gone origin-later || return 1
    claim restored 64Mi vduse-ext4 Filesystem origin-snap || return 1
    pod restore-reader restored Filesystem 'md5sum < /data/blob' || return 1
    bound restored >/dev/null || return 1
    finished restore-reader || return 1
    restored=$(podlog restore-reader)
    echo "source at the snapshot: $sum; restored: $restored"
    [[ -n $sum && $restored == "$sum" ]] || return 1
    gone restore-reader
}

# Deleting a claim (reclaimPolicy Delete) deletes its PV and the volume's image on the node.
scenario_deleting_the_claim_removes_the_image() {
    local pv i
    claim doomed 32Mi vduse-ext4 Filesystem || return 1
    pod doomed-user doomed Filesystem 'echo x > /data/x && sync' || return 1
    pv=$(bound doomed) || return 1
    finished doomed-user || return 1
    gone doomed-user || return 1
    unstaged "$pv" || return 1
    "$BIN" volume list --state-dir /var/lib/vduse-csi | grep -w "$pv" || return 1
    find /var/lib/vduse-csi -name "*$pv*" | head -3
    kc delete pvc doomed --wait=true --timeout=120s || return 1
    kc wait --for=delete --timeout=120s pv "$pv" >/dev/null 2>&1
    if kc get pv "$pv" 2>/dev/null; then
        echo "the PV outlived its claim"
        return 1
    fi
    if "$BIN" volume list --state-dir /var/lib/vduse-csi | grep -w "$pv" || [[ -n $(find /var/lib/vduse-csi -name "*$pv*") ]]; then
        echo "the image outlived its claim: $(find /var/lib/vduse-csi -name "*$pv*")"
        return 1
    fi
    echo "PV and image of $pv are gone"
}

# An ephemeral inline volume in the pod spec: kubelet publishes it with no claim, the pod
# writes and checks its data there, and when the pod goes the device and the image go too.
scenario_ephemeral_inline_volume_lives_with_its_pod() {
    local devices_before
    devices_before=$(ls /sys/class/vduse)
    pod_with scratch "volumeMounts: [{name: scratch, mountPath: /scratch}]" \
        "{name: scratch, csi: {driver: $DRIVER, fsType: ext4, volumeAttributes: {size: 64Mi}}}" \
        'dd if=/dev/urandom of=/scratch/f bs=64k count=16 2>/dev/null && md5sum /scratch/f > /tmp/sum && sync && md5sum -c /tmp/sum && df -k /scratch | tail -n1 && sleep 600' ||
        return 1
    running scratch || return 1
    local i out
    for ((i = 0; i < 60; i++)); do
        (($(podlog scratch | wc -l) >= 2)) && break
        sleep 1
    done
    out=$(podlog scratch)
    echo "pod: $(tr '\n' ';' <<<"$out")"
    [[ $(head -n1 <<<"$out") == "/scratch/f: OK" ]] || return 1
    # The plugin's inventory: one ephemeral volume of 64 MiB, staged and published once.
    "$BIN" volume list --state-dir /var/lib/vduse-csi
    "$BIN" volume list --state-dir /var/lib/vduse-csi --output json >"$OUT/ephemeral.json" || return 1
    python3 - "$OUT/ephemeral.json" <<'PY' || return 1
import json, sys
vols = [v for v in json.load(open(sys.argv[1])) if v["kind"] == "ephemeral"]
assert len(vols) == 1, vols
v = vols[0]
assert v["size_bytes"] == 64 << 20 and v["block_device"] and len(v["publications"]) == 1, v
assert not v["qos"] and v["condition"] == "normal", v
print("ephemeral volume", v["id"], "served as", v["block_device"])
PY
    gone scratch || return 1
    for ((i = 0; i < 60; i++)); do
        "$BIN" volume list --state-dir /var/lib/vduse-csi | grep -q ephemeral || break
        sleep 1
    done
    if "$BIN" volume list --state-dir /var/lib/vduse-csi | grep ephemeral; then
        echo "the ephemeral volume outlived its pod"
        return 1
    fi
    if [[ $(ls /sys/class/vduse) != "$devices_before" ]]; then
        echo "a VDUSE device outlived the pod: $(ls /sys/class/vduse)"
        return 1
    fi
    echo "device and image are gone with the pod"
}

# rbd_written CLAIM CLASS: a claim on the RBD StorageClass CLASS (its Secret holds a cephx
# `profile rbd` user's key) that a pod wrote, synced and left; prints "PV CHECKSUM" of the data,
# and nothing else on stdout.
rbd_written() {
    local pv sum
    claim "$1" 128Mi "$2" Filesystem >&2 || return 1
    pv=$(bound "$1") || return 1
    echo "provisioned $pv: $(kc get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle} {.spec.csi.volumeAttributes}')" >&2
    # external-provisioner puts its identity into every PV's volume attributes, which kubelet
    # passes to NodeStage as the volume context: the stage below must take it.
    kc get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes}' | grep -q 'storage.kubernetes.io/csiProvisionerIdentity' ||
        return 1
    rbd -c "$CEPH/ceph.conf" ls rbd >&2
    pod "$1-writer" "$1" Filesystem 'dd if=/dev/urandom of=/data/blob bs=64k count=32 2>/dev/null && sync && md5sum < /data/blob' >&2 || return 1
    finished "$1-writer" || return 1
    sum=$(podlog "$1-writer")
    gone "$1-writer" >&2 || return 1
    [[ -n $sum ]] || return 1
    echo "$pv $sum"
}

# read_back CLAIM SUM: a new pod reads the claim's data; true if its checksum is SUM.
read_back() {
    local read
    pod "$1-reader" "$1" Filesystem 'md5sum < /data/blob' || return 1
    finished "$1-reader" || return 1
    read=$(podlog "$1-reader")
    gone "$1-reader" || return 1
    echo "written $2, read back $read"
    [[ $read == "$2" ]]
}

# An RBD claim with cephx: the controller creates the image as the restricted user, the node
# stages it with the same Secret; the data outlives the pod: after the volume is unstaged (its
# device gone), a new pod reads it back.
scenario_rbd_claim_with_cephx_outlives_its_pod() {
    local written devices
    grep -q "auth client required = cephx" "$CEPH/ceph.conf" || return 1
    devices=$(ls /sys/class/vduse)
    written=$(rbd_written rbd-data vduse-rbd-ext4) || return 1
    # An RBD volume's device is named after its volume ID's hash: the devices are as before.
    unstaged "${written% *}" || return 1
    wait_for 60 "the RBD device to go" sh -c '[ "$(ls /sys/class/vduse)" = "$1" ]' - "$devices" || return 1
    read_back rbd-data "${written#* }"
}

# An RBD snapshot (the RBD VolumeSnapshotClass) and a claim restored from it: equal data.
scenario_rbd_snapshot_and_restore() {
    local written sum restored
    written=$(rbd_written rbd-origin vduse-rbd-ext4) || return 1
    sum=${written#* }
    snapshot rbd-snap rbd-origin vduse-rbd-snapclass || return 1
    claim rbd-restored 128Mi vduse-rbd-ext4 Filesystem rbd-snap || return 1
    bound rbd-restored >/dev/null || return 1
    pod rbd-restore-reader rbd-restored Filesystem 'md5sum < /data/blob' || return 1
    finished rbd-restore-reader || return 1
    restored=$(podlog rbd-restore-reader)
    echo "source: $sum; restored: $restored"
    [[ $restored == "$sum" ]] || return 1
    gone rbd-restore-reader
}

# The Helm chart, rendered with RBD enabled (tests/e2e/render-chart.py on the host, as
# `helm template` would), installed the same way after deploy/ is uninstalled: the node
# plugin and the RBD controller come up, and an RBD claim a pod wrote is read by another.
scenario_helm_chart_with_rbd_installs_and_serves() {
    # Nothing of deploy/'s install may stay behind: pods, snapshots and claims first (their
    # deletion needs the driver), then its objects.
    kc delete pods --all --wait=true --timeout=300s || return 1
    kc delete volumesnapshots --all --wait=true --timeout=300s || return 1
    kc delete pvc --all --wait=true --timeout=300s || return 1
    wait_for 300 "every PV deleted" sh -c "[ -z \"\$('$K/kubectl' get pv -o name)\" ]" || return 1
    uninstall "$OUT/deploy-rbd.yaml" "$OUT/deploy.yaml" || return 1
    say "deploy/ uninstalled; installing the chart"
    kc create namespace $NS || return 1
    # The key is base64: it may hold '/' and '+', so no sed.
    local key chart
    key=$(<"$CEPH/client.kubernetes.key") && chart=$(<"$CHART_RBD") || return 1
    printf '%s\n' "${chart//@CEPHX_USER_KEY@/$key}" >"$W/chart-rbd.yaml"
    overlay chart-rbd "$HERE/overlay/node-daemonset.yaml" "$HERE/overlay/rbd-controller.yaml" -- "$W/chart-rbd.yaml" ||
        return 1
    apply "$OUT/chart-rbd.yaml" || return 1
    installed || return 1
    kc -n $NS get pods -o wide
    local written
    written=$(rbd_written chart-rbd vduse-rbd-ext4) || return 1
    read_back chart-rbd "${written#* }"
}

SCENARIOS=(
    installed_with_kubectl_apply
    pod_writes_and_a_new_pod_reads_back
    block_claim_is_a_device_in_the_pod
    expansion_by_editing_the_claim_reaches_the_pod
    snapshot_restores_equal_data
    deleting_the_claim_removes_the_image
    plugin_container_killed_while_a_pod_writes
    read_only_claim_and_two_pods_on_one_volume
    ephemeral_inline_volume_lives_with_its_pod
    rbd_claim_with_cephx_outlives_its_pod
    rbd_snapshot_and_restore
    helm_chart_with_rbd_installs_and_serves
)

run_scenarios() {
    local name passed=0 failed=0 start
    for name in "${SCENARIOS[@]}"; do
        [[ -n ${E2E_FILTER:-} && $name != *"$E2E_FILTER"* ]] && continue
        start=$(cut -d' ' -f1 /proc/uptime)
        say "scenario $name"
        if ("scenario_$name") >"$OUT/$name.log" 2>&1; then
            echo "RESULT $name PASS" >>"$OUT/results"
            passed=$((passed + 1))
        else
            echo "RESULT $name FAIL" >>"$OUT/results"
            failed=$((failed + 1))
        fi
        say "scenario $name: $(tail -n1 "$OUT/results" | cut -d' ' -f3) after $(echo "$(cut -d' ' -f1 /proc/uptime) - $start" | bc)s"
    done
    say "$passed passed, $failed failed"
    ((failed == 0 && passed > 0))
}
