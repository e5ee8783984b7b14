# shellcheck shell=bash
# The kubelet end-to-end scenarios, sourced by guest-kubelet.sh once the node is Ready and
# kubelet has registered the driver. Each runs through kubectl against the real kubelet.

ENDPOINT=unix:///var/lib/kubelet/plugins/$DRIVER/csi.sock

# volume_for ID SIZE MODE: CreateVolume through our Controller, then a PV and a PVC bound to it
# (external-provisioner has no image here, so the PV is declared the way it would declare it).
volume_for() {
    local id=$1 size=$2 mode=$3 block=()
    [[ $mode == Block ]] && block=(--block)
    "$BIN" volume create "$id" --size "$size" "${block[@]}" --endpoint "$ENDPOINT" || return 1
    kc apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: $id}
spec:
  capacity: {storage: $size}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  volumeMode: $mode
  storageClassName: ""
  csi: {driver: $DRIVER, volumeHandle: $id, fsType: ext4}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $id}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: $id
  volumeMode: $mode
  resources: {requests: {storage: $size}}
YAML
}

# pod NAME CLAIM MODE SCRIPT [READ_ONLY]: a pod on our node running SCRIPT with the claim at
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

# pod_with NAME ATTACH VOLUME SCRIPT: a pod on our node running SCRIPT, with the volume VOLUME
# (a pod-spec volume, in YAML flow style) attached as ATTACH says.
pod_with() {
    kc apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeName: $NODE
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
    local phase i
    for ((i = 0; i < 600; i++)); do
        phase=$(kc get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null)
        case $phase in
        Succeeded) return 0 ;;
        Failed)
            kc describe pod "$1"
            return 1
            ;;
        esac
        # A pod still not done after a minute: what every process waits on, for the log.
        ((i == 60)) && ps -eo pid,ppid,stat,wchan:30,args >"$OUT/ps-$1.log" 2>&1
        sleep 1
    done
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

# unstaged ID: the volume's device and staging mount are gone (kubelet unstaged it).
unstaged() {
    local i
    for ((i = 0; i < 120; i++)); do
        if [[ ! -e /sys/class/vduse/$1 ]] && ! grep -q "/$1/globalmount" /proc/mounts; then
            return 0
        fi
        sleep 1
    done
    echo "volume $1 is still staged: $(ls /sys/class/vduse) / $(grep "$1" /proc/mounts)"
    return 1
}

# A PV from CreateVolume, a PVC and a pod that writes a file; a new pod on the same claim
# reads it back; after the last pod the device and the mount are gone.
scenario_pod_writes_and_a_new_pod_reads_back() {
    local id=pvc-e2e-fs
    volume_for $id 64Mi Filesystem || return 1
    pod writer $id Filesystem 'echo written-by-the-first-pod > /data/file && sync && cat /data/file' || return 1
    finished writer || return 1
    [[ $(podlog writer) == written-by-the-first-pod ]] || return 1
    gone writer || return 1
    pod reader $id Filesystem 'cat /data/file' || return 1
    finished reader || return 1
    local read
    read=$(podlog reader)
    echo "read back: $read"
    [[ $read == written-by-the-first-pod ]] || return 1
    gone reader || return 1
    unstaged $id || return 1
    grep -E "NodeStageVolume|NodePublishVolume|MountDevice" "$OUT/kubelet.daemon.log" | head -5
}

# A raw block claim: the pod writes the device and reads the bytes back.
scenario_block_claim_is_a_device_in_the_pod() {
    local id=pvc-e2e-block
    volume_for $id 32Mi Block || return 1
    pod block $id Block 'echo block-data-e2e | dd of=/dev/xvda bs=512 conv=sync,fsync 2>/dev/null && dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -c 14' || return 1
    finished block || return 1
    [[ $(podlog block) == block-data-e2e ]] || return 1
    gone block || return 1
    unstaged $id
}

running() { # NAME: waits until the pod runs; fails at once if it ended instead
    local i phase
    for ((i = 0; i < 300; i++)); do
        phase=$(kc get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null)
        case $phase in
        Running) return 0 ;;
        Succeeded | Failed)
            echo "pod $1 ended ($phase) instead of running: $(podlog "$1" | tr '\n' ';')"
            break
            ;;
        esac
        sleep 1
    done
    kc describe pod "$1"
    return 1
}

# The plugin is killed (SIGKILL) and started again while a pod writes files in a loop: the
# writes stall and resume, the pod sees no error, every file's checksum holds, and the kernel
# logs no I/O error.
scenario_plugin_killed_while_a_pod_writes() {
    local id=pvc-e2e-restart
    volume_for $id 128Mi Filesystem || return 1
    pod looper $id Filesystem 'i=0; while [ $i -lt 400 ]; do dd if=/dev/urandom of=/data/f$i bs=4k count=16 2>/dev/null || exit 1; md5sum /data/f$i >>/data/sums || exit 1; i=$((i+1)); done; sync; echo wrote $i files' || return 1
    running looper || return 1
    sleep 3
    say "killing the plugin (pid $PID_plugin) while the pod writes"
    kill -KILL "$PID_plugin"
    sleep 2
    start plugin "$BIN" serve --endpoint "$ENDPOINT" --node-id $NODE --state-dir /var/lib/vduse-csi \
        --kubelet-registration-dir /var/lib/kubelet/plugins_registry
    finished looper || return 1
    podlog looper
    [[ $(podlog looper) == "wrote 400 files" ]] || return 1
    gone looper || return 1
    pod checker $id Filesystem 'md5sum -c /data/sums | grep -vc ": OK$"; wc -l < /data/sums' || return 1
    finished checker || return 1
    echo "checker: $(podlog checker | tr '\n' ' ')"
    [[ $(podlog checker | tr '\n' ' ') == "0 400 " ]] || return 1
    gone checker || return 1
    if dmesg | grep -iE "I/O error|blk_update_request" | grep -v loop; then return 1; fi
    unstaged $id
}

# A pod with a read-only claim gets EROFS; two pods on one RWO volume on this node both work.
scenario_read_only_claim_and_two_pods_on_one_volume() {
    local id=pvc-e2e-shared
    volume_for $id 64Mi Filesystem || return 1
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
    for p in first second reader; do gone $p || return 1; done
    unstaged $id
}

# Our manifests as far as Kubernetes 1.20 takes them: what it refuses is listed, not hidden.
scenario_manifests_apply_to_kubernetes_1_20() {
    local f refused=0
    for f in "$REPO"/deploy/0*.yaml "$REPO"/deploy/20-storageclasses.yaml; do
        if kc apply -f "$f" >"$OUT/apply.out" 2>&1; then
            echo "applied $(basename "$f"): $(tr '\n' ' ' <"$OUT/apply.out")"
        else
            echo "REFUSED $(basename "$f"): $(tr '\n' ' ' <"$OUT/apply.out")"
            refused=$((refused + 1))
        fi
    done
    for f in 10-node-daemonset 30-volumesnapshotclass; do
        kc apply --dry-run=server -f "$REPO/deploy/$f.yaml" >"$OUT/apply.out" 2>&1 &&
            echo "accepted (dry run) $f: $(tr '\n' ' ' <"$OUT/apply.out")" ||
            echo "REFUSED (dry run) $f: $(tr '\n' ' ' <"$OUT/apply.out")"
    done
    kc get storageclass -o name
    ((refused == 0))
}

# Online expansion: the PV grows (what csi-resizer's node-only expansion does when the claim is
# raised; the resizer has no image here), kubelet calls NodeExpandVolume while the pod runs,
# and df in the pod shows the new size.
scenario_online_expansion_reaches_the_pod() {
    local id=pvc-e2e-grow before after i
    volume_for $id 64Mi Filesystem || return 1
    pod grower $id Filesystem 'df -k /data | tail -1; while [ ! -e /data/stop ]; do df -k /data | tail -1 > /data/df; sleep 1; done' || return 1
    running grower || return 1
    sleep 3
    before=$(awk '{print $2}' < <(podlog grower | tail -1))
    kc patch pv $id -p '{"spec":{"capacity":{"storage":"256Mi"}}}' || return 1
    for ((i = 0; i < 240; i++)); do
        [[ $(kc get pvc $id -o jsonpath='{.status.capacity.storage}') == 256Mi ]] && break
        sleep 1
    done
    kc get pvc $id -o jsonpath='{.status.capacity.storage}{"\n"}'
    grep -h "NodeExpandVolume\|expanded" "$OUT/kubelet.daemon.log" "$OUT/plugin.daemon.log" | tail -3
    sleep 3
    after=$(awk '{print $2}' /var/lib/kubelet/plugins/kubernetes.io/csi/pv/$id/globalmount/df 2>/dev/null ||
        awk '{print $2}' "$(ls -d /var/lib/kubelet/pods/*/volumes/kubernetes.io~csi/$id/mount)/df")
    echo "df in the pod: $before KiB before, $after KiB after"
    touch "$(ls -d /var/lib/kubelet/pods/*/volumes/kubernetes.io~csi/$id/mount)/stop"
    finished grower || return 1
    gone grower || return 1
    ((after > 3 * before)) || return 1
    unstaged $id
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

run_scenarios() {
    local name passed=0 failed=0 start
    for name in $(declare -F | awk '{print $3}' | grep '^scenario_' | sed 's/^scenario_//'); do
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
