#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh): the same fio jobs on the same data
# through every peer, each at its defaults and at its best flags, at one queue and at the
# default count, with the image on two kinds of storage, in interleaved rounds in one boot.
#
# Storage (BENCH_STORAGE, default "tmpfs ext4"):
#   tmpfs  the image on the guest's /tmp: no O_DIRECT, the page cache is the storage
#   ext4   the image on ext4 over a loop device (backed by a tmpfs file): O_DIRECT is real,
#          a direct read or write goes through ext4 to the block layer, never ext4's page cache
# Configurations (BENCH_PEERS picks peers: "vduse-csi qsd rublk loop", plus "metrics"):
#   vduse-csi           `vduse-csi device serve` with its defaults (--cache none: O_DIRECT
#                       where the filesystem takes it, the page cache on tmpfs)
#   vduse-csi+wb        the same with --cache writeback (ext4 only; on tmpfs it is the default)
#   vduse-csi+own       the defaults with --own-bounce-pages (our huge pages as bounce pages)
#   vduse-csi+variant   with BENCH_VARIANT set: the defaults with those arguments too, for an
#                       A/B of a flag inside one boot (it counts as ours in the comparison)
#   qsd                 qemu-storage-daemon --export vduse-blk with its defaults (no iothread,
#                       cache.direct=off, aio=threads)
#   qsd+iothread        with an iothread and aio=io_uring (cache.direct=off: see qsd())
#   rublk               `rublk add loop` with its defaults (direct I/O)
#   rublk+buffered      the same with --buffered-io (the page cache)
#   loop                the kernel loop device, --direct-io=on (one queue count: it has its own)
#   vduse-metrics       ours with its metrics endpoint counting, 4k jobs (with "metrics")
# Each job's figure is the median over the rounds. Every configuration is labelled
# CONFIG/STORAGE/qQUEUES in bench.raw. The server process's CPU time (all its threads,
# /proc/PID/stat, user + system) over the span fio counts is written per 100k requests to
# bench.cpu, and so is the busy time of the whole guest (all vCPUs); bench.split sets the two
# apart. bench.table shows every configuration, and for each row our best against the best
# configuration of the best server peer (qsd, rublk; the goal is >= 1.00x on every row) and
# against the kernel loop device, the in-kernel ceiling. Everything in the guest is
# emulated (TCG): compare ratios, not absolute figures.
set -euo pipefail

BIN=${VDUSE_CSI_BIN:?}
OUT=${GUEST_OUT_DIR:?}
RUNTIME=${BENCH_RUNTIME:-5}
SIZE_MB=${BENCH_SIZE_MB:-512}
QUEUES=${BENCH_QUEUES:-2}
ROUNDS=${BENCH_ROUNDS:-3}
PEERS=${BENCH_PEERS:-vduse-csi qsd rublk loop}
STORAGES=${BENCH_STORAGE:-tmpfs ext4}
COUNTS=1
[[ $QUEUES != 1 ]] && COUNTS="1 $QUEUES"
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
W=/tmp/bench
mkdir -p "$W"

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
if [[ -n ${BENCH_JOBS:-} ]]; then
    picked=()
    for j in "${JOBS[@]}"; do [[ " $BENCH_JOBS " == *" ${j%% *} "* ]] && picked+=("$j"); done
    JOBS=("${picked[@]}")
fi

# shellcheck source=bench/fio-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio-lib.sh"

# The data: filled in full, so that reads hit data, not holes; every target serves it.
dd if=/dev/urandom of="$W/bench.img" bs=1M count="$SIZE_MB" status=none
declare -A IMG
IMG[tmpfs]=$W/bench.img
if [[ " $STORAGES " == *" ext4 "* ]]; then
    truncate -s "$((SIZE_MB + SIZE_MB / 4 + 64))M" "$W/ext4.backing"
    # The loop device does direct I/O on its backing file, so nothing under ext4 caches.
    ext4_loop=$(losetup -f --show --direct-io=on "$W/ext4.backing")
    mkfs.ext4 -q -F "$ext4_loop"
    mkdir -p "$W/ext4"
    mount "$ext4_loop" "$W/ext4"
    cp "$W/bench.img" "$W/ext4/bench.img"
    sync
    IMG[ext4]=$W/ext4/bench.img
    # Only the ext4 copy is served there: the tmpfs original is dropped if tmpfs is not run.
    [[ " $STORAGES " == *" tmpfs "* ]] || rm -f "$W/bench.img"
fi

peer() { [[ " $PEERS " == *" $1 "* ]]; }

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

# jobs LABEL DEV [JOB...]: the jobs (all by default) on DEV, with SERVER_PID counted
jobs_on() {
    local label=$1 dev=$2 j
    shift 2
    if (($#)); then
        for j in "$@"; do run_job "$label" "$dev" "$j"; done
    else
        run_jobs "$label" "$dev"
    fi
}

ours() { # LABEL IMAGE QUEUES [JOB...]; $EXTRA: more arguments for device serve
    local label=$1 img=$2 queues=$3 pid i
    shift 3
    # shellcheck disable=SC2086 # EXTRA is a list of arguments
    "$BIN" device serve --image "$img" --name bench0 --queues "$queues" --log-level warn ${EXTRA:-} >"$W/ours.out" &
    pid=$!
    for i in $(seq 1 600); do [[ -s $W/ours.out ]] && break; sleep 0.1; done
    SERVER_PID=$pid jobs_on "$label" "$(head -n1 "$W/ours.out")" "$@"
    : >"$W/ours.out"
    kill -TERM "$pid"; wait "$pid"
}

qsd() { # LABEL IMAGE QUEUES best|default
    local label=$1 img=$2 queues=$3 pid i file=() export_opts dev
    file=(--blockdev "file,filename=$img,node-name=d0")
    export_opts="vduse-blk,id=e0,node-name=d0,name=qsd0,num-queues=$queues,writable=on"
    if [[ $4 == best ]]; then
        # Not cache.direct=on on ext4: the kernel will not pin its bounce pages for O_DIRECT
        # (their mapping is VM_IO), and qsd then fails the partition scan's reads and fio's
        # with EFAULT (docs/PERFORMANCE.md; we fall back to the page cache, qsd does not).
        file=(--object iothread,id=t0 --blockdev "file,filename=$img,node-name=d0,aio=io_uring")
        export_opts+=",iothread=t0"
    fi
    qemu-storage-daemon "${file[@]}" --export "$export_opts" &
    pid=$!
    for i in $(seq 1 100); do [[ -e /sys/class/vduse/qsd0 ]] && break; sleep 0.1; done
    vdpa dev add name qsd0 mgmtdev vduse
    dev=$(wait_block qsd0)
    SERVER_PID=$pid jobs_on "$label" "$dev"
    vdpa dev del qsd0
    kill -TERM "$pid"; wait "$pid" || true
}

have_rublk() { command -v rublk >/dev/null && [[ -e /dev/ublk-control ]]; }

rublk_peer() { # LABEL QUEUES [ADD ARGS...]
    local label=$1 queues=$2 i
    shift 2
    # 1 MiB I/O buffers, so that a 1 MiB request is not split in two (its default is 512 KiB).
    rublk add "$@" -n 0 -q "$queues" -d 128 -b 1MiB --quiet
    for i in $(seq 1 100); do [[ -b /dev/ublkb0 ]] && break; sleep 0.1; done
    # `rublk add` leaves a daemon behind: the process that serves the queues.
    SERVER_PID=$(pgrep -x rublk | head -n1) jobs_on "$label" /dev/ublkb0
    rublk del -n 0
}

loop_peer() { # LABEL IMAGE
    local dev
    dev=$(losetup --direct-io=on -f --show "$2" 2>/dev/null)
    SERVER_PID='' jobs_on "$1" "$dev"
    losetup -d "$dev"
}

# config FN ARG...: one configuration, in a subshell of its own, so that its failure (a server
# that does not come up, a fio error) costs its rows, not the boot. The failure is reported and
# listed in bench.failed, whatever it left running is cleared, and the rounds go on. (A
# background subshell keeps `set -e`; one on the left of `||` would not.)
config() {
    ("$@") &
    if ! wait $!; then
        echo "configuration failed, its rows are missing: $*" >&2
        echo "$*" >>"$OUT/bench.failed"
        pkill -KILL -f "$BIN device serve" 2>/dev/null || true
        pkill -KILL -f qemu-storage-daemon 2>/dev/null || true
        vdpa dev del qsd0 2>/dev/null || true
        have_rublk && { rublk del -n 0 >/dev/null 2>&1 || true; }
        sleep 0.5
        "$BIN" device remove bench0 >/dev/null 2>&1 || true
    fi
}

: >"$OUT/bench.raw"
: >"$OUT/bench.cpu"
# The whole guest's busy time too, for bench.split.
export GUEST_CPU=1
: >"$OUT/bench.failed"
for round in $(seq 1 "$ROUNDS"); do
    echo "--- round $round" >&2
    for s in $STORAGES; do
        img=${IMG[$s]}
        for q in $COUNTS; do
            if peer vduse-csi; then
                config ours "vduse-csi/$s/q$q" "$img" "$q"
                [[ $s != tmpfs ]] && EXTRA="--cache writeback" config ours "vduse-csi+wb/$s/q$q" "$img" "$q"
                EXTRA="--own-bounce-pages" config ours "vduse-csi+own/$s/q$q" "$img" "$q"
                if [[ -n ${BENCH_VARIANT:-} ]]; then
                    EXTRA=$BENCH_VARIANT config ours "vduse-csi+variant/$s/q$q" "$img" "$q"
                fi
            fi
            if peer metrics && [[ $s == tmpfs && $q == "$QUEUES" ]]; then
                EXTRA="--metrics-address 127.0.0.1:9813" config ours "vduse-metrics/$s/q$q" "$img" "$q" "${JOBS[@]:0:4}"
            fi
            if peer qsd; then
                config qsd "qsd/$s/q$q" "$img" "$q" default
                config qsd "qsd+iothread/$s/q$q" "$img" "$q" best
            fi
            if peer rublk; then
                if have_rublk; then
                    config rublk_peer "rublk/$s/q$q" "$q" loop -f "$img"
                    config rublk_peer "rublk+buffered/$s/q$q" "$q" loop -f "$img" --buffered-io
                else
                    echo "rublk: not available" >&2
                fi
            fi
            # The loop device has its own queues: run once, shown at every count.
            if peer loop && [[ $q == 1 ]]; then config loop_peer "loop/$s/q1" "$img"; fi
        done
    done
done

# The tables: per storage and queue count, each job's median IOPS for every configuration,
# then ours (our best configuration) against the best configuration of every other peer.
awk -v counts="$COUNTS" -v storages="$STORAGES" -v cpufile="$OUT/bench.cpu" '
function median(key,    n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? a[int((n + 1) / 2)] : 0
}
# the peer a configuration belongs to: its name up to "+"
function peer_of(config) { sub(/\+.*/, "", config); return config }
BEGIN {
    while ((getline line < cpufile) > 0) { split(line, f, " "); if (f[3] == "srv") cpu[f[1]" "f[2]] = cpu[f[1]" "f[2]] " " f[4] }
}
{
    split($1, part, "/"); config = part[1]
    vals[$1" "$2] = vals[$1" "$2] " " $3
    if (!seenjob[$2]++) jobs[nj++] = $2
    if (!seenconf[config]++) confs[nc++] = config
}
END {
    ns = split(storages, S, " "); nq = split(counts, Q, " ")
    worst = 0
    for (si = 1; si <= ns; si++) for (qi = 1; qi <= nq; qi++) {
        s = S[si]; q = Q[qi]
        printf "\n== image on %s, %d queue%s: IOPS (server CPU seconds per 100k requests)\n", s, q, (q == 1 ? "" : "s")
        printf "%-18s", "job"
        for (c = 0; c < nc; c++) if (confs[c] != "vduse-metrics") printf " %20s", confs[c]
        printf " %24s %9s\n", "ours / best server", "ours/loop"
        for (i = 0; i < nj; i++) {
            j = jobs[i]; printf "%-18s", j
            delete best; delete bestc
            for (c = 0; c < nc; c++) {
                conf = confs[c]; if (conf == "vduse-metrics") continue
                # the loop device runs at one queue count only
                label = conf "/" s "/q" (conf == "loop" ? 1 : q)
                v = median(label " " j)
                vals["cpu"] = cpu[label " " j]; u = median("cpu")
                if (v && u) printf " %12d (%5.2f)", v, u; else if (v) printf " %12d        ", v; else printf " %20s", "-"
                p = peer_of(conf)
                if (v > best[p]) { best[p] = v; bestc[p] = conf }
            }
            # The servers (qsd, rublk) are the peers; the kernel loop device, with no server
            # and no frontend crossing, is the in-kernel ceiling, in a column of its own.
            ours = best["vduse-csi"]; top = 0; topc = ""
            for (p in best) if (p != "vduse-csi" && p != "loop" && best[p] > top) { top = best[p]; topc = bestc[p] }
            if (ours && top) {
                r = ours / top
                printf " %7.2fx %-16s", r, topc
                if (!worst || r < worst) { worst = r; worstrow = j " on " s " at " q " queue(s), vs " topc }
            } else printf " %24s", "-"
            if (ours && best["loop"]) printf " %8.2fx\n", ours / best["loop"]; else printf "\n"
        }
    }
    if (worst) printf "\nworst row against the best server: %.2fx, %s\n", worst, worstrow
    # Counting on against off: the same device and jobs, with and without the metrics endpoint.
    for (c = 0; c < nc; c++) if (confs[c] == "vduse-metrics") {
        printf "\nmetrics on vs off (IOPS):\n%-18s %10s %10s %8s\n", "job", "off", "on", "on/off"
        for (i = 0; i < nj; i++) {
            j = jobs[i]
            for (k in vals) if (k ~ ("^vduse-metrics/[^ ]* " j "$")) { split(k, kk, " "); label = kk[1] }
            m = median(label " " j); sub(/^vduse-metrics/, "vduse-csi", label); o = median(label " " j)
            if (m) printf "%-18s %10d %10d %7.3fx\n", j, o, m, (o ? m / o : 0)
        }
    }
}' "$OUT/bench.raw" | tee "$OUT/bench.table"
if [[ -s $OUT/bench.failed ]]; then
    echo
    echo "configurations that failed (their rows are missing or short):"
    sed 's/^/  /' "$OUT/bench.failed"
fi | tee -a "$OUT/bench.table"

# Where each configuration's CPU goes, per 100k requests: its server process, and the rest of
# the guest over the same span (fio, the block layer and the frontend's kernel path: VDUSE's
# bounce copies and interrupt work items, or ublk's driver). Where the guest's vCPUs are all
# busy, the total decides the IOPS, and the rest tells what a server cannot save.
awk -v counts="$COUNTS" -v storages="$STORAGES" '
function median(key,    n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? a[int((n + 1) / 2)] : 0
}
$3 == "srv" || $3 == "guest" {
    split($1, part, "/"); if (!seenconf[part[1]]++) confs[nc++] = part[1]
    if (!seenjob[$2]++) jobs[nj++] = $2
    vals[$1" "$2" "$3] = vals[$1" "$2" "$3] " " $4
}
END {
    ns = split(storages, S, " "); nq = split(counts, Q, " ")
    for (si = 1; si <= ns; si++) for (qi = 1; qi <= nq; qi++) {
        s = S[si]; q = Q[qi]
        printf "\n== image on %s, %d queue%s: CPU seconds per 100k requests, server + rest of the guest\n", s, q, (q == 1 ? "" : "s")
        printf "%-18s", "job"; for (c = 0; c < nc; c++) printf " %20s", confs[c]; printf "\n"
        for (i = 0; i < nj; i++) {
            j = jobs[i]; printf "%-18s", j
            for (c = 0; c < nc; c++) {
                label = confs[c] "/" s "/q" (confs[c] == "loop" ? 1 : q)
                g = median(label " " j " guest"); v = median(label " " j " srv")
                if (g) printf " %9.2f + %8.2f", v, g - v; else printf " %20s", "-"
            }
            printf "\n"
        }
    }
}' "$OUT/bench.cpu" | tee "$OUT/bench.split"
