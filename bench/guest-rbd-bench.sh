#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh): the RBD rows. A one-node Ceph
# (tests/ceph/cluster.sh, BlueStore on a file, loopback only, cephx unless
# BENCH_CEPH_AUTH=none) serves one image, filled with
# data; the same fio jobs run on it through three block devices, in interleaved rounds within
# this one boot:
#   vduse-rbd   our `vduse-csi device serve --rbd` (librbd, asynchronous, cache off)
#   krbd        the kernel's own RBD client (`rbd map`)
#   rbd-nbd     librbd behind the kernel's NBD client (`rbd-nbd map`), ceph-csi's other mounter
#   librbd      fio's own librbd engine, no block device at all: what librbd itself reaches,
#               the ceiling of any userspace client (ours and rbd-nbd add a frontend to it);
#               with librbd's cache off, as ours runs (its default write-around cache would
#               answer writes before the OSD has them)
#   null        our frontend alone on the client's vCPU (`device serve --null`, no Ceph): with
#               librbd's row it bounds ours, whose request is a librbd operation inside one
#               of these (the "bound" table below)
# Only one of them has the image open at a time (each takes the exclusive lock). The OSD runs
# in the same TCG guest as the client, so every row is bounded by it: compare ratios.
#
# With 2 or more vCPUs (BENCH_PIN=1, the default) the Ceph daemons are pinned to vCPU 0 and
# the client side (fio, our server, rbd-nbd) to vCPU 1, so the two do not take each other's
# CPU, and each vCPU's busy time while fio counts is reported per 100k requests (bench.cpu).
# krbd's work runs in the kernel where it is queued: its submissions on the client's vCPU,
# its replies mostly where the loopback delivers them (the OSD's), so its client figure is
# low and the all-vCPU figure is the fair one to compare.
# BENCH_RBD_TUNED="CEPH_ARGS": one more device, ours with those librados options.
# BENCH_RBD_BASELINE_BIN=PATH: one more device, ours as served by another build (the binary
# at PATH, which the guest sees as the host does), compared with this build within each round.
# BENCH_RBD_DEVICES: which of vduse_rbd, librbd, krbd, rbd_nbd and null run (all by default).
# BENCH_JOBS: a subset of the jobs below, by name (all by default).
# BENCH_PERF="JOB...": after the rounds, one more round samples the whole guest with perf
# during those jobs (it is not in the medians), and bench.perf gives each device's CPU by
# thread and its hottest functions.
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
# cephx on, as on users' clusters (every client then signs its messages): ours connects as the
# `profile rbd` user the tests and the README's install use, the others as client.admin.
AUTH=${BENCH_CEPH_AUTH:-cephx}
CEPH_AUTH=$AUTH "$here/../tests/ceph/cluster.sh" start "$CEPH"
CEPH_USER=()
[[ $AUTH == cephx ]] && CEPH_USER=(--ceph-user kubernetes --ceph-key-file "$CEPH/client.kubernetes.key")
trap '"$here/../tests/ceph/cluster.sh" stop "$CEPH"' EXIT
C=(-c "$CEPH/ceph.conf")
# shellcheck source=bench/rbd-lib.sh
source "$here/rbd-lib.sh"
# Each client process gets an admin socket of its own (the conf's one is per name, and every
# CLI call as client.admin would take it over), so that stall_report can ask it what it waits for.
export CEPH_ARGS="--admin-socket=$CEPH/run/\$name.\$pid.asok"
CLIENT=()
if [[ ${BENCH_PIN:-1} != 0 && $(nproc) -ge 2 ]]; then
    pin_ceph 0
    CLIENT=(taskset -c 1)
    export FIO_CPU=1
    : >"$OUT/bench.cpu"
    : >"$OUT/bench.ctxt"
fi
filled_image bench "$SIZE_MB"

# name rw bs iodepth numjobs
JOBS=(
    "randread-4k-qd1 randread 4k 1 1"
    "randread-4k-qd32 randread 4k 32 1"
    "randwrite-4k-qd1 randwrite 4k 1 1"
    "randwrite-4k-qd32 randwrite 4k 32 1"
    "read-1m-qd8 read 1M 8 1"
    "write-1m-qd8 write 1M 8 1"
)
if [[ -n ${BENCH_JOBS:-} ]]; then
    picked=()
    for j in "${JOBS[@]}"; do [[ " $BENCH_JOBS " == *" ${j%% *} "* ]] && picked+=("$j"); done
    JOBS=("${picked[@]}")
fi
# shellcheck source=bench/fio-lib.sh
source "$here/fio-lib.sh"

# stall_report PEER NAME (called by run_job when a job has not ended long after its time): what
# the guest knows of the stall, into $OUT/stall-PEER-NAME.txt, since Ceph's logs live in the
# guest's tmpfs and go with it: the cluster's health, the OSD's operations in flight, blocked
# and slow, each client's outstanding requests (librados's objecter, through whichever client
# admin sockets exist), which daemons still run, the space left, a daemon's crash backtrace,
# the kernel's last lines and the tail of every daemon's log.
stall_report() {
    local sock log
    {
        echo "=== $(date -u +%FT%TZ): fio's $2 on $1 has not ended"
        timeout 30 ceph "${C[@]}" -s
        timeout 30 ceph "${C[@]}" health detail
        # A daemon that died still counts as up in `ceph -s` until the mon's grace ends.
        echo "=== Ceph daemons running"
        pgrep -a '^ceph-' || echo "none"
        echo "=== space under $CEPH"
        df -h "$CEPH"
        for log in "$CEPH"/log/*.log; do
            echo "=== crash lines in $log"
            grep -n -m 3 -A 40 'Caught signal\|FAILED ceph_assert\|ceph_abort\|bluefs enospc' "$log"
        done
        for sock in "$CEPH"/run/*.asok; do
            echo "=== $sock"
            case ${sock##*/} in
            osd.*)
                for cmd in dump_ops_in_flight dump_blocked_ops dump_historic_slow_ops; do
                    timeout 30 ceph --admin-daemon "$sock" "$cmd"
                done
                ;;
            client.*) timeout 30 ceph --admin-daemon "$sock" objecter_requests ;;
            esac
        done
        echo "=== dmesg (last 50 lines)"
        dmesg | tail -n 50
        for log in "$CEPH"/log/*; do
            echo "=== $log (last 100 lines)"
            tail -n 100 "$log"
        done
    } >"$OUT/stall-$1-$2.txt" 2>&1 || true
}

# on_ours LABEL ARGS...: `device serve ARGS` on the client's vCPU, fio's jobs on the device it
# prints, then a clean stop. A server that prints no device within a minute fails the run.
on_ours() {
    local label=$1 pid dev
    shift
    rm -f "$W/ours.out"
    "${CLIENT[@]}" "$BIN" device serve "$@" --queues "$QUEUES" --log-level warn >"$W/ours.out" &
    pid=$!
    if ! dev=$(served_device "$W/ours.out"); then
        echo "device serve $* printed no device within a minute" >&2
        kill -KILL "$pid" 2>/dev/null || true
        return 1
    fi
    run_jobs "$label" "$dev"
    kill -TERM "$pid"; wait "$pid"
}

# serve_ours LABEL [CEPH_ARGS]: ours on the image, with these librados options added.
serve_ours() {
    CEPH_ARGS="$CEPH_ARGS ${2:-}" on_ours "$1" --rbd rbd/bench --ceph-monitors 127.0.0.1:6789 "${CEPH_USER[@]}" --name rbdbench
}

vduse_rbd() { serve_ours vduse-rbd; }
vduse_rbd_tuned() { serve_ours vduse-rbd-tuned "$BENCH_RBD_TUNED"; }
# Another build of ours, for comparing two builds in one boot (boots differ more than builds).
vduse_rbd_base() { BIN=$BENCH_RBD_BASELINE_BIN serve_ours vduse-rbd-base; }

# The guest has no udev: `noudev` keeps the rbd CLI from waiting for its events for ever
# (devtmpfs makes /dev/rbdN). Every map and unmap is bounded, so a hang fails the run.
krbd() {
    local dev
    dev=$(timeout 120 rbd "${C[@]}" device map -o noudev rbd/bench)
    run_jobs krbd "$dev"
    timeout 120 rbd "${C[@]}" device unmap -o noudev "$dev"
}

librbd() { CEPH_ARGS="$CEPH_ARGS --rbd_cache=false" CEPH_CONF=$CEPH/ceph.conf run_jobs librbd rbd:rbd/bench; }

# null: our frontend alone, on the client's vCPU like the others.
null() { on_ours null --null --size "${SIZE_MB}M" --name rbdnull; }

rbd_nbd() {
    local dev
    dev=$(timeout 120 "${CLIENT[@]}" rbd-nbd "${C[@]}" map rbd/bench)
    run_jobs rbd-nbd "$dev"
    timeout 120 rbd-nbd "${C[@]}" unmap "$dev"
}

: >"$OUT/bench.raw"
# Each round starts with another device: the cluster is slower in its first minutes (the mgr
# loads its modules, the OSD settles after the fill) and the guest drifts, so every device
# gets one early slot and the median drops it.
read -ra devices <<<"${BENCH_RBD_DEVICES:-vduse_rbd librbd krbd rbd_nbd null}"
[[ -n ${BENCH_RBD_TUNED:-} ]] && devices+=(vduse_rbd_tuned)
[[ -n ${BENCH_RBD_BASELINE_BIN:-} ]] && devices+=(vduse_rbd_base)
# The guest's state after each round (bench.rounds): a drift of the figures over the boot can
# be told from memory running short (the OSD's file and Ceph's logs live in the guest's RAM).
: >"$OUT/bench.rounds"
for round in $(seq 1 "$ROUNDS"); do
    echo "--- round $round" >&2
    for i in "${!devices[@]}"; do
        "${devices[$(((round - 1 + i) % ${#devices[@]}))]}"
    done
    {
        echo "after round $round: load $(cut -d' ' -f1-3 /proc/loadavg)"
        free -m
        df -m "$CEPH" | tail -n 1
        grep -E '^(compact_stall|pgscan_direct|pgscan_kswapd|thp_fault_fallback) ' /proc/vmstat
    } >>"$OUT/bench.rounds"
done
if [[ -n ${BENCH_PERF:-} ]]; then
    echo "--- perf round (not in the medians)" >&2
    mv "$OUT/bench.raw" "$OUT/bench.raw.keep"
    for f in bench.cpu bench.ctxt; do if [[ -e $OUT/$f ]]; then mv "$OUT/$f" "$OUT/$f.keep"; fi; done
    for d in "${devices[@]}"; do PERF_JOBS=$BENCH_PERF "$d"; done
    mv "$OUT/bench.raw" "$OUT/bench.raw.perf"
    mv "$OUT/bench.raw.keep" "$OUT/bench.raw"
    for f in bench.cpu bench.ctxt; do if [[ -e $OUT/$f.keep ]]; then mv "$OUT/$f.keep" "$OUT/$f"; fi; done
    : >"$OUT/bench.perf"
    for f in "$OUT"/perf-*.data; do
        {
            echo "=== ${f##*/perf-}: CPU by thread (all vCPUs), then the hottest functions"
            # sed, not head: head's early exit would end the pipeline with SIGPIPE (set -e).
            perf report -i "$f" --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | sed -n 1,15p
            perf report -i "$f" --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | sed -n 1,40p
        } >>"$OUT/bench.perf"
    done
fi

# median(KEY): the median of the numbers listed, space-separated, in vals[KEY]
MEDIAN='
function median(key,    n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? a[int((n + 1) / 2)] : 0
}'
# span(KEY): the median of the numbers in vals[KEY] and their range, as "0.85x (0.70-0.98)"
SPAN='
function span(key,    n, i, lo, hi, a) {
    n = split(vals[key], a, " ")
    if (!n) return "-"
    lo = hi = a[1]
    for (i = 2; i <= n; i++) { if (a[i] + 0 < lo + 0) lo = a[i]; if (a[i] + 0 > hi + 0) hi = a[i] }
    return sprintf("%.2fx (%.2f-%.2f)", median(key), lo, hi)
}'

# Table: per job, each device's median IOPS and MiB/s over the rounds, and our ratio to each.
awk "$MEDIAN"'
{ vals[$1" "$2] = vals[$1" "$2] " " $3; mb[$1" "$2] = mb[$1" "$2] " " $4; if (!seen[$2]++) order[n++] = $2 }
END {
    printf "%-18s %10s %7s %10s %7s %10s %7s %10s %7s %9s %10s %10s\n", "job", "vduse-rbd", "MiB/s", "krbd", "MiB/s", "rbd-nbd", "MiB/s", "librbd", "MiB/s", "vs krbd", "vs rbd-nbd", "vs librbd"
    for (i = 0; i < n; i++) {
        j = order[i]
        o = median("vduse-rbd "j); k = median("krbd "j); b = median("rbd-nbd "j); l = median("librbd "j)
        vals["m"] = mb["vduse-rbd "j]; om = median("m"); vals["m"] = mb["krbd "j]; km = median("m")
        vals["m"] = mb["rbd-nbd "j]; bm = median("m"); vals["m"] = mb["librbd "j]; lm = median("m")
        printf "%-18s %10d %7d %10d %7d %10d %7d %10d %7d %8.2fx %9.2fx %9.2fx\n", j, o, om, k, km, b, bm, l, lm, (k ? o/k : 0), (b ? o/b : 0), (l ? o/l : 0)
    }
}' "$OUT/bench.raw" | tee "$OUT/bench.table"
# versus_ours LABEL: that device's IOPS against ours (the defaults of this build) within each
# round, as the median of the rounds' ratios and their range (see the paired table below).
versus_ours() {
    awk "$MEDIAN$SPAN"'
    { k = $1" "$2; r = ++count[k]; iops[k" "r] = $3; if (r > rounds) rounds = r; if (!seen[$2]++) order[n++] = $2 }
    END {
        printf "%-18s %10s %10s %20s\n", "job", "ours", label, "ratio (range)"
        for (i = 0; i < n; i++) {
            j = order[i]; delete vals
            for (r = 1; r <= rounds; r++) {
                o = iops["vduse-rbd "j" "r]; t = iops[label" "j" "r]
                vals["o"] = vals["o"] " " o; vals["t"] = vals["t"] " " t
                if (o && t) vals["q"] = vals["q"] " " t / o
            }
            printf "%-18s %10d %10d %20s\n", j, median("o"), median("t"), span("q")
        }
    }' label="$1" "$OUT/bench.raw" | tee -a "$OUT/bench.table"
}
if [[ -n ${BENCH_RBD_TUNED:-} ]]; then
    echo "ours with CEPH_ARGS=\"$BENCH_RBD_TUNED\" against ours with the defaults (median IOPS, and the within-round ratio):" | tee -a "$OUT/bench.table"
    versus_ours vduse-rbd-tuned
fi
if [[ -n ${BENCH_RBD_BASELINE_BIN:-} ]]; then
    echo "ours as built at $BENCH_RBD_BASELINE_BIN against this build (median IOPS, and the within-round ratio):" | tee -a "$OUT/bench.table"
    versus_ours vduse-rbd-base
fi

# The bound of ours: each of our requests is a librbd operation inside a request of our
# frontend, so its latency is at least librbd's plus the null frontend's, and its IOPS at most
# 1 / (1/librbd + 1/null) at the same depth. That is exact at QD1, where nothing overlaps; at
# greater depths the stages overlap, the model is an estimate, and librbd's own row is the
# firmer ceiling (a frontend cannot make librbd faster). On the client vCPU the two costs add
# as well: 100k / (librbd's + null's CPU seconds per 100k) is what ours reaches with that vCPU
# always busy. The table sets the lower of the two against krbd and rbd-nbd.
if grep -q '^null ' "$OUT/bench.raw" && grep -q '^librbd ' "$OUT/bench.raw"; then
    echo "the bound of ours from librbd and the null frontend (IOPS; latency model, client-CPU model, the lower against the others):" | tee -a "$OUT/bench.table"
    touch "$OUT/bench.cpu"
    awk "$MEDIAN"'
    FNR == NR { vals[$1" "$2] = vals[$1" "$2] " " $3; if (!seen[$2]++) order[n++] = $2; next }
    $3 == "cpu1" { vals["cpu "$1" "$2] = vals["cpu "$1" "$2] " " $4 }
    END {
        printf "%-18s %9s %9s %9s %9s %9s %9s %10s %10s\n", "job", "librbd", "null", "latency", "cpu", "ours", "vs bound", "bound/krbd", "bound/nbd"
        for (i = 0; i < n; i++) {
            j = order[i]; l = median("librbd "j); z = median("null "j)
            lat = (l && z) ? 1 / (1 / l + 1 / z) : 0
            c = median("cpu librbd "j) + median("cpu null "j); cpu = c ? 100000 / c : 0
            b = (cpu && cpu < lat) ? cpu : lat
            o = median("vduse-rbd "j); k = median("krbd "j); r = median("rbd-nbd "j)
            printf "%-18s %9d %9d %9d %9d %9d %8.2fx %9.2fx %9.2fx\n", j, l, z, lat, cpu, o, (b ? o / b : 0), (k ? b / k : 0), (r ? b / r : 0)
        }
    }' "$OUT/bench.raw" "$OUT/bench.cpu" | tee -a "$OUT/bench.table"
fi

# Paired ratios: the cluster's speed drifts within a boot (its first minutes are slow, and a
# slot can run at half the speed of the next), and a ratio of medians taken from different
# rounds carries that drift. Within a round the devices run back to back, so each round gives
# one ratio of ours to each other device, and to the bound from that round's librbd and null
# figures; the table shows their median and their range over the rounds. A range that holds
# 1.00 says the row is within the boot's noise of the other.
if grep -q '^vduse-rbd ' "$OUT/bench.raw"; then
    echo "ours against each device within each round (median of the rounds' ratios, and their range):" | tee -a "$OUT/bench.table"
    awk "$MEDIAN$SPAN"'
    { k = $1" "$2; r = ++count[k]; iops[k" "r] = $3; if (r > rounds) rounds = r; if (!seen[$2]++) order[n++] = $2 }
    END {
        printf "%-18s %20s %20s %20s %20s\n", "job", "vs bound", "vs krbd", "vs rbd-nbd", "vs librbd"
        for (i = 0; i < n; i++) {
            j = order[i]
            delete vals
            for (r = 1; r <= rounds; r++) {
                o = iops["vduse-rbd "j" "r]; l = iops["librbd "j" "r]; z = iops["null "j" "r]
                if (!o) continue
                if (l && z) vals["bound"] = vals["bound"] " " o * (1 / l + 1 / z)
                if (iops["krbd "j" "r]) vals["krbd"] = vals["krbd"] " " o / iops["krbd "j" "r]
                if (iops["rbd-nbd "j" "r]) vals["nbd"] = vals["nbd"] " " o / iops["rbd-nbd "j" "r]
                if (l) vals["librbd"] = vals["librbd"] " " o / l
            }
            printf "%-18s %20s %20s %20s %20s\n", j, span("bound"), span("krbd"), span("nbd"), span("librbd")
        }
    }' "$OUT/bench.raw" | tee -a "$OUT/bench.table"
fi

# CPU: per job and device, the median over the rounds of each vCPU's busy seconds per 100k
# requests while fio counted, net of the idle rates (vCPU 1: the client side; all: both, the
# kernel's share included).
if [[ -s $OUT/bench.cpu ]]; then
    echo "CPU seconds per 100k requests, net of the idle rates (median of the rounds), client vCPU / all vCPUs:" | tee -a "$OUT/bench.table"
    awk "$MEDIAN"'
    # One line per (peer, job, cpu, round): sum the vCPUs of each run into "all".
    {
        run = $1" "$2" "(++count[$1" "$2" "$3]); total[run] += $4
        if ($3 == "cpu1") vals[$1" "$2" client"] = vals[$1" "$2" client"] " " $4
        if (!pseen[$1]++) peers[np++] = $1
        if (!seen[$2]++) order[n++] = $2
    }
    END {
        for (r in total) { split(r, f, " "); vals[f[1]" "f[2]" all"] = vals[f[1]" "f[2]" all"] " " total[r] }
        printf "%-18s", "job"; for (p = 0; p < np; p++) printf " %21s", peers[p]; printf "\n"
        for (i = 0; i < n; i++) {
            j = order[i]; printf "%-18s", j
            for (p = 0; p < np; p++) printf " %10.2f / %8.2f", median(peers[p]" "j" client"), median(peers[p]" "j" all")
            printf "\n"
        }
    }' "$OUT/bench.cpu" | tee -a "$OUT/bench.table"
fi

# Context switches: per job and device, the median over the rounds of the whole guest's
# switches per request while fio counted, net of the idle rate (bench/fio-lib.sh). Each thread
# a request passes through costs a switch to it and one away, whichever vCPU runs it: the
# count of hops on a request's path.
if [[ -s $OUT/bench.ctxt ]]; then
    echo "context switches per request, whole guest, net of the idle rate (median of the rounds):" | tee -a "$OUT/bench.table"
    awk "$MEDIAN"'
    {
        vals[$1" "$2] = vals[$1" "$2] " " $3
        if (!pseen[$1]++) peers[np++] = $1
        if (!seen[$2]++) order[n++] = $2
    }
    END {
        printf "%-18s", "job"; for (p = 0; p < np; p++) printf " %15s", peers[p]; printf "\n"
        for (i = 0; i < n; i++) {
            j = order[i]; printf "%-18s", j
            for (p = 0; p < np; p++) printf " %15.2f", median(peers[p]" "j)
            printf "\n"
        }
    }' "$OUT/bench.ctxt" | tee -a "$OUT/bench.table"
fi
