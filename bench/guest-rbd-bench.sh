#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh): the RBD rows. A one-node Ceph
# (tests/ceph/cluster.sh, BlueStore on a file, loopback only) serves one image, filled with
# data; the same fio jobs run on it through three block devices, in interleaved rounds within
# this one boot:
#   vduse-rbd   our `vduse-csi device serve --rbd` (librbd, asynchronous, cache off)
#   krbd        the kernel's own RBD client (`rbd map`)
#   rbd-nbd     librbd behind the kernel's NBD client (`rbd-nbd map`), ceph-csi's other mounter
# Only one of them has the image open at a time (each takes the exclusive lock). The OSD runs
# in the same 2-vCPU TCG guest as the client, so every row is bounded by it: compare ratios.
set -euo pipefail

BIN=${VDUSE_CSI_BIN:?}
OUT=${GUEST_OUT_DIR:?}
RUNTIME=${BENCH_RUNTIME:-5}
SIZE_MB=${BENCH_RBD_SIZE_MB:-256}
QUEUES=${BENCH_QUEUES:-2}
ROUNDS=${BENCH_ROUNDS:-3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
W=/tmp/bench-rbd
mkdir -p "$W"
CEPH=/tmp/ceph
"$here/../tests/ceph/cluster.sh" start "$CEPH"
trap '"$here/../tests/ceph/cluster.sh" stop "$CEPH"' EXIT
C=(-c "$CEPH/ceph.conf")
rbd "${C[@]}" create --size "${SIZE_MB}M" rbd/bench
# Written in full, so reads fetch data from the OSD rather than answering holes with zeroes.
rbd "${C[@]}" bench --io-type write --io-size 4M --io-threads 4 --io-pattern seq \
    --io-total "${SIZE_MB}M" rbd/bench >/dev/null

# name rw bs iodepth numjobs
JOBS=(
    "randread-4k-qd1 randread 4k 1 1"
    "randread-4k-qd32 randread 4k 32 1"
    "randwrite-4k-qd1 randwrite 4k 1 1"
    "randwrite-4k-qd32 randwrite 4k 32 1"
    "read-1m-qd8 read 1M 8 1"
    "write-1m-qd8 write 1M 8 1"
)
# shellcheck source=bench/fio-lib.sh
source "$here/fio-lib.sh"

vduse_rbd() {
    local pid dev i
    "$BIN" device serve --rbd rbd/bench --ceph-monitors 127.0.0.1:6789 --name rbdbench \
        --queues "$QUEUES" --log-level warn >"$W/ours.out" &
    pid=$!
    for i in $(seq 1 600); do [[ -s $W/ours.out ]] && break; sleep 0.1; done
    dev=$(head -n1 "$W/ours.out")
    run_jobs vduse-rbd "$dev"
    kill -TERM "$pid"; wait "$pid"
}

# The guest has no udev: `noudev` keeps the rbd CLI from waiting for its events for ever
# (devtmpfs makes /dev/rbdN). Every map and unmap is bounded, so a hang fails the run.
krbd() {
    local dev
    dev=$(timeout 120 rbd "${C[@]}" device map -o noudev rbd/bench)
    run_jobs krbd "$dev"
    timeout 120 rbd "${C[@]}" device unmap -o noudev "$dev"
}

rbd_nbd() {
    local dev
    dev=$(timeout 120 rbd-nbd "${C[@]}" map rbd/bench)
    run_jobs rbd-nbd "$dev"
    timeout 120 rbd-nbd "${C[@]}" unmap "$dev"
}

: >"$OUT/bench.raw"
# Each round starts with another device: the cluster is slower in its first minutes (the mgr
# loads its modules, the OSD settles after the fill) and the guest drifts, so every device
# gets one early slot and the median drops it.
devices=(vduse_rbd krbd rbd_nbd)
for round in $(seq 1 "$ROUNDS"); do
    echo "--- round $round" >&2
    for i in 0 1 2; do
        "${devices[$(((round - 1 + i) % 3))]}"
    done
done

# Table: per job, each device's median IOPS and MiB/s over the rounds, and our ratio to each.
awk '
function median(key,    n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? a[int((n + 1) / 2)] : 0
}
{ vals[$1" "$2] = vals[$1" "$2] " " $3; mb[$1" "$2] = mb[$1" "$2] " " $4; if (!seen[$2]++) order[n++] = $2 }
END {
    printf "%-18s %10s %7s %10s %7s %10s %7s %9s %10s\n", "job", "vduse-rbd", "MiB/s", "krbd", "MiB/s", "rbd-nbd", "MiB/s", "vs krbd", "vs rbd-nbd"
    for (i = 0; i < n; i++) {
        j = order[i]
        o = median("vduse-rbd "j); k = median("krbd "j); b = median("rbd-nbd "j)
        vals["m"] = mb["vduse-rbd "j]; om = median("m"); vals["m"] = mb["krbd "j]; km = median("m")
        vals["m"] = mb["rbd-nbd "j]; bm = median("m")
        printf "%-18s %10d %7d %10d %7d %10d %7d %8.2fx %9.2fx\n", j, o, om, k, km, b, bm, (k ? o/k : 0), (b ? o/b : 0)
    }
}' "$OUT/bench.raw" | tee "$OUT/bench.table"
