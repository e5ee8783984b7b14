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

# pod NAME CLAIM MODE SCRIPT: a pod on our node running SCRIPT with the claim at /data
# (Filesystem) or /dev/xvda (Block).
pod() {
    local name=$1 claim=$2 mode=$3 script=$4 attach
    if [[ $mode == Block ]]; then
        attach="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
    else
        attach="volumeMounts: [{name: v, mountPath: /data}]"
    fi
    kc apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $name}
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
    command: [/bin/sh, -c, '$script']
    securityContext: {privileged: true}
    $attach
  volumes: [{name: v, persistentVolumeClaim: {claimName: $claim}}]
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
    cat /var/log/pods/default_"$1"_*/c/*.log | cut -d' ' -f4-
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
