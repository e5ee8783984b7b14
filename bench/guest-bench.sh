#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh): the same fio jobs on the same image
# through four block devices, in interleaved rounds within this one boot:
#   vduse-csi   our `vduse-csi device serve` (default cache mode, which on tmpfs means the
#               page cache: there it is the storage)
#   qsd         qemu-storage-daemon --export vduse-blk (QEMU's C implementation), with an
#               iothread and its default cache mode (the page cache), like ours
#   rublk       rublk's ublk loop target (a ublk server in Rust), with --buffered-io, like ours
#   loop        the kernel loop device with direct I/O (the in-kernel ceiling)
# and, with PEERS containing "null", two targets that store nothing, to measure what each
# frontend costs with the storage taken out:
#   vduse-null  our device with `--null` (the kernel's VDUSE path + our queue engine)
#   rublk-null  rublk's null target (the kernel's ublk path + rublk's queue loop)
# With PEERS containing "metrics", our device runs the 4k jobs once more with its metrics
# endpoint on (counting in every queue), to show what counting costs:
#   vduse-metrics  `device serve --metrics-address ...` (the vduse-csi row counts nothing)
# Every target has BENCH_QUEUES queues (loop has its own). One more row runs our device with
# a single queue, to show what the second queue buys. Each round brings every target up in
# turn and runs every job; the table shows each job's median over the rounds. Everything in
# the guest is emulated (TCG): compare ratios, not absolute figures.
set -euo pipefail

BIN=${VDUSE_CSI_BIN:?}
OUT=${GUEST_OUT_DIR:?}
RUNTIME=${BENCH_RUNTIME:-5}
SIZE_MB=${BENCH_SIZE_MB:-512}
QUEUES=${BENCH_QUEUES:-2}
ROUNDS=${BENCH_ROUNDS:-3}
PEERS=${BENCH_PEERS:-vduse-csi qsd rublk loop null metrics}
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
W=/tmp/bench
mkdir -p "$W"
img=$W/bench.img
# Fill the whole image so reads hit data, not holes; every target serves this same file.
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MB" status=none

# name rw bs iodepth numjobs
JOBS=(
    "randread-4k-qd1 randread 4k 1 1"
    "randread-4k-qd32 randread 4k 32 1"
    "randwrite-4k-qd1 randwrite 4k 1 1"
    "randwrite-4k-qd32 randwrite 4k 32 1"
    "read-1m-qd8 read 1M 8 1"
    "write-1m-qd8 write 1M 8 1"
    "randread-4k-2x32 randread 4k 32 2"
)

# shellcheck source=bench/fio-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio-lib.sh"

wait_block() { # vdpa device name -> /dev/vdX
    local i d
    for i in $(seq 1 300); do
        for d in /sys/bus/vdpa/devices/"$1"/virtio*/block/*; do
            [[ -e $d ]] && { echo "/dev/${d##*/}"; return 0; }
        done
        sleep 0.1
    done
    return 1
}

peer() { [[ " $PEERS " == *" $1 "* ]]; }

ours() { # LABEL QUEUES [JOB...]; $BACKEND: what the device serves (default: the image)
    local label=$1 queues=$2 pid dev i
    shift 2
    # shellcheck disable=SC2086 # BACKEND is a list of arguments
    "$BIN" device serve ${BACKEND:---image $img} --name bench0 --queues "$queues" --log-level warn ${EXTRA:-} >"$W/ours.out" &
    pid=$!
    for i in $(seq 1 600); do [[ -s $W/ours.out ]] && break; sleep 0.1; done
    dev=$(head -n1 "$W/ours.out")
    : >"$W/ours.out"
    if (($#)); then
        for j in "$@"; do run_job "$label" "$dev" "$j"; done
    else
        run_jobs "$label" "$dev"
    fi
    kill -TERM "$pid"; wait "$pid"
}

# Our device again, counting for its metrics endpoint, on the 4k jobs.
metrics_rows() {
    EXTRA="--metrics-address 127.0.0.1:9813" ours vduse-metrics "$QUEUES" "${JOBS[@]:0:4}"
}

qsd() {
    local pid dev i
    qemu-storage-daemon --object iothread,id=t0 \
        --blockdev "file,filename=$img,node-name=d0" \
        --export "vduse-blk,id=e0,node-name=d0,name=qsd0,num-queues=$QUEUES,writable=on,queue-size=256,iothread=t0" &
    pid=$!
    for i in $(seq 1 100); do [[ -e /sys/class/vduse/qsd0 ]] && break; sleep 0.1; done
    vdpa dev add name qsd0 mgmtdev vduse
    dev=$(wait_block qsd0)
    run_jobs qsd "$dev"
    vdpa dev del qsd0
    kill -TERM "$pid"; wait "$pid" || true
}

rublk_peer() { # LABEL TARGET [TARGET ARGS...]
    local label=$1 i
    shift
    # 1 MiB I/O buffers, so that a 1 MiB request is not split in two (its default is 512 KiB).
    rublk add "$@" -n 0 -q "$QUEUES" -d 128 -b 1MiB --quiet
    for i in $(seq 1 100); do [[ -b /dev/ublkb0 ]] && break; sleep 0.1; done
    run_jobs "$label" /dev/ublkb0
    rublk del -n 0
}

have_rublk() { command -v rublk >/dev/null && [[ -e /dev/ublk-control ]]; }

loop_peer() {
    local dev
    dev=$(losetup --direct-io=on -f --show "$img")
    run_jobs loop "$dev"
    losetup -d "$dev"
}

: >"$OUT/bench.raw"
for round in $(seq 1 "$ROUNDS"); do
    echo "--- round $round" >&2
    # The guest slows down as a boot goes on, so the metrics rows go first in every other
    # round: on and off then see the same drift.
    if peer metrics && ((round % 2 == 0)); then metrics_rows; fi
    if peer vduse-csi; then ours vduse-csi "$QUEUES"; ours vduse-csi-1q 1 "${JOBS[1]}"; fi
    if peer metrics && ((round % 2 == 1)); then metrics_rows; fi
    if peer qsd; then qsd; fi
    if peer rublk; then
        if have_rublk; then rublk_peer rublk loop -f "$img" --buffered-io; else echo "rublk: not available" >&2; fi
    fi
    if peer loop; then loop_peer; fi
    if peer null; then
        BACKEND="--null --size ${SIZE_MB}M" ours vduse-null "$QUEUES"
        BACKEND="--null --size ${SIZE_MB}M" ours vduse-null-1q 1 "${JOBS[1]}"
        if have_rublk; then rublk_peer rublk-null null; fi
    fi
done

# Table: per job, each target's median IOPS and MiB/s over the rounds, and our ratio to each
# peer (IOPS). The last line compares our 2-job row with the 1-queue QD32 row.
awk '
function median(key,    n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? a[int((n + 1) / 2)] : 0
}
{ if ($1 == "vduse-null") seen_null = 1; if ($1 == "vduse-metrics") seen_metrics = 1; vals[$1" "$2] = vals[$1" "$2] " " $3; mb[$1" "$2] = mb[$1" "$2] " " $4; if (!seen[$2]++) order[n++] = $2 }
END {
    printf "%-18s %10s %7s %10s %7s %10s %7s %10s %7s %8s %8s %8s\n", "job", "vduse-csi", "MiB/s", "qsd", "MiB/s", "rublk", "MiB/s", "loop", "MiB/s", "vs qsd", "vs rublk", "vs loop"
    for (i = 0; i < n; i++) {
        j = order[i]
        o = median("vduse-csi "j); q = median("qsd "j); r = median("rublk "j); l = median("loop "j)
        vals["m"] = mb["vduse-csi "j]; om = median("m"); vals["m"] = mb["qsd "j]; qm = median("m")
        vals["m"] = mb["rublk "j]; rm = median("m"); vals["m"] = mb["loop "j]; lm = median("m")
        printf "%-18s %10d %7d %10d %7d %10d %7d %10d %7d %7.2fx %7.2fx %7.2fx\n", j, o, om, q, qm, r, rm, l, lm, (q ? o/q : 0), (r ? o/r : 0), (l ? o/l : 0)
    }
    one = median("vduse-csi-1q randread-4k-qd32"); two = median("vduse-csi randread-4k-2x32")
    if (one) printf "vduse-csi randread-4k: 1 queue QD32 %d IOPS; 2 queues x 2 jobs x QD32 %d IOPS (%.2fx)\n", one, two, two / one
    # Counting on against off: the same device and jobs, with and without the metrics endpoint.
    if (seen_metrics) {
        printf "\nmetrics on vs off (IOPS):\n%-18s %10s %10s %8s\n", "job", "off", "on", "on/off"
        for (i = 0; i < n; i++) {
            j = order[i]; m = median("vduse-metrics "j); o = median("vduse-csi "j)
            if (m) printf "%-18s %10d %10d %7.3fx\n", j, o, m, (o ? m/o : 0)
        }
    }
    if (!seen_null) exit
    # The frontends alone (no storage): what bounds each row. "ours/null" is how much of its
    # own ceiling our device reaches; "null/X" is the ceiling against the peers.
    printf "\nno storage (IOPS):\n%-18s %10s %10s %13s %9s %9s %9s %9s\n", "job", "vduse-null", "rublk-null", "null/rublknull", "ours/null", "null/qsd", "null/rublk", "null/loop"
    for (i = 0; i < n; i++) {
        j = order[i]
        v = median("vduse-null "j); u = median("rublk-null "j); o = median("vduse-csi "j)
        q = median("qsd "j); r = median("rublk "j); l = median("loop "j)
        if (!v) continue
        printf "%-18s %10d %10d %12.2fx %8.2fx %8.2fx %8.2fx %8.2fx\n", j, v, u, (u ? v/u : 0), o/v, (q ? v/q : 0), (r ? v/r : 0), (l ? v/l : 0)
    }
    one = median("vduse-null-1q randread-4k-qd32"); two = median("vduse-null randread-4k-2x32")
    if (one) printf "vduse-null randread-4k: 1 queue QD32 %d IOPS; 2 queues x 2 jobs x QD32 %d IOPS (%.2fx)\n", one, two, two / one
}' "$OUT/bench.raw" | tee "$OUT/bench.table"
