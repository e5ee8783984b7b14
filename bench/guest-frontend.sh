#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh with BENCH_FRONTEND=1): what the
# frontends cost with the storage taken out, at several queue counts, in one boot.
#   vduse-null         our `device serve --null` (the kernel's VDUSE path + our queue engine)
#   vduse-null-nopoll  the same with --poll-us 0 (never polls the ring after a request)
#   vduse-null-irq1    the same with each virtqueue's interrupt bound to one CPU, the first
#                      of the mask virtio_vdpa gave it (VDUSE otherwise moves every injected
#                      interrupt to the next CPU of the mask: with one queue, every other
#                      completion runs on the other vCPU)
#   rublk-null         rublk's null target (the kernel's ublk path + rublk's queue loop)
# Each at every count of FRONTEND_QUEUES (default "1 2 4"). Interleaved rounds give IOPS
# medians (bench.frontend). Then one more round, not in the medians, counts per request
# (perf stat over the span fio counts):
#   srv-cpu-us   CPU time of the server process (all its threads, /proc/PID/stat)
#   all-cpu-us   CPU time of the whole guest, both vCPUs (/proc/stat, idle and iowait out)
#   cs           context switches, whole guest
#   wq           workqueue items run, whole guest (a VDUSE interrupt is one: the kernel
#                runs the virtqueue callback from a work item)
#   srv-sys      system calls of the server process, and the three most frequent
# and a last round samples the whole guest with perf (cpu-clock, call graphs) on the
# one-queue rows, reported by thread and by function (bench.frontend-perf).
set -euo pipefail

BIN=${VDUSE_CSI_BIN:?}
OUT=${GUEST_OUT_DIR:?}
RUNTIME=${BENCH_RUNTIME:-5}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE_MB=${BENCH_SIZE_MB:-512}
COUNTS=${FRONTEND_QUEUES:-1 2 4}
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
W=/tmp/frontend
mkdir -p "$W"

# name rw bs iodepth numjobs
JOBS=(
    "randread-4k-qd1 randread 4k 1 1"
    "randread-4k-qd32 randread 4k 32 1"
    "randread-4k-2x32 randread 4k 32 2"
)
# shellcheck source=bench/fio-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio-lib.sh"

# Events perf stat counts: only those this kernel has (an unknown one fails the whole stat).
usable() { # EVENT... -> the usable ones, comma-separated
    local e ok=()
    for e in "$@"; do perf stat -e "$e" -- true >/dev/null 2>&1 && ok+=("$e"); done
    local IFS=,
    echo "${ok[*]}"
}
ALL_EVENTS=$(usable context-switches workqueue:workqueue_execute_start)
SRV_EVENTS=$(usable raw_syscalls:sys_enter syscalls:sys_enter_ioctl syscalls:sys_enter_epoll_wait \
    syscalls:sys_enter_io_uring_enter syscalls:sys_enter_sched_yield syscalls:sys_enter_write syscalls:sys_enter_read)
echo "perf stat events: whole guest: $ALL_EVENTS; server: $SRV_EVENTS" >&2

SERVER_PID=
# up TARGET QUEUES: brings TARGET up; sets DEV and SERVER_PID
up() {
    local i
    case $1 in
    vduse-null*)
        local extra=() f mask
        [[ $1 == vduse-null-nopoll ]] && extra=(--poll-us 0)
        "$BIN" device serve --null --size "${SIZE_MB}M" --name fe0 --queues "$2" --log-level warn "${extra[@]}" >"$W/ours.out" &
        SERVER_PID=$!
        for i in $(seq 1 600); do [[ -s $W/ours.out ]] && break; sleep 0.1; done
        DEV=$(head -n1 "$W/ours.out")
        if [[ $1 == vduse-null-irq1 ]]; then
            for f in /sys/class/vduse/fe0/vq*/irq_cb_affinity; do
                mask=$(tr -d ',' <"$f")
                # the lowest set bit of the hexadecimal mask, as a mask of its own
                printf '%x\n' $(((16#$mask) & -(16#$mask))) >"$f"
            done
            echo "vduse-null-irq1: $(grep -H . /sys/class/vduse/fe0/vq*/irq_cb_affinity | tr '\n' ' ')" >&2
        fi
        ;;
    rublk-null)
        rublk add null -n 0 -q "$2" -d 128 --quiet
        for i in $(seq 1 100); do [[ -b /dev/ublkb0 ]] && break; sleep 0.1; done
        DEV=/dev/ublkb0
        # rublk add leaves a daemon behind, the process that serves the queues.
        SERVER_PID=$(pgrep -x rublk | head -n1)
        ;;
    esac
    [[ -b $DEV && -n $SERVER_PID ]] || { echo "$1: did not come up" >&2; exit 1; }
}

down() {
    case $1 in
    vduse-null*) kill -TERM "$SERVER_PID"; wait "$SERVER_PID" ;;
    rublk-null) rublk del -n 0 ;;
    esac
}

TARGETS=(vduse-null vduse-null-nopoll vduse-null-irq1)
command -v rublk >/dev/null && [[ -e /dev/ublk-control ]] && TARGETS+=(rublk-null)

busy_ticks() { # all vCPUs' busy ticks (fio-lib.sh's cpu_busy, summed)
    cpu_busy | awk '{ s += $2 } END { print s }'
}

# counted TARGET Q JOB: one fio run with perf stat over its counted span; appends a line of
# per-request figures to bench.frontend-counts.
counted() {
    local target=$1 q=$2 name rw bs qd jobs fio_pid all_pid srv_pid p0 p1 b0 b1 line iops reqs hz
    read -r name rw bs qd jobs <<<"$3"
    hz=$(getconf CLK_TCK)
    fio --name="$name" --filename="$DEV" --ioengine=libaio --direct=1 --size="${SIZE_MB}M" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs="$jobs" --group_reporting --runtime="$RUNTIME" --ramp_time=1 --time_based \
        --randrepeat=0 --norandommap --output-format=terse --terse-version=3 >"$W/fio.out" &
    fio_pid=$!
    sleep 1
    p0=$(proc_cpu "$SERVER_PID"); b0=$(busy_ticks)
    perf stat -x, -o "$W/all.stat" -a -e "$ALL_EVENTS" -- sleep "$RUNTIME" &
    all_pid=$!
    perf stat -x, -o "$W/srv.stat" -p "$SERVER_PID" -e "$SRV_EVENTS" -- sleep "$RUNTIME" &
    srv_pid=$!
    # Not a bare `wait`: our server is a child of this shell too.
    wait "$fio_pid" "$all_pid" "$srv_pid"
    p1=$(proc_cpu "$SERVER_PID"); b1=$(busy_ticks)
    line=$(cat "$W/fio.out")
    if [[ $rw == *read ]]; then iops=$(cut -d';' -f8 <<<"$line"); else iops=$(cut -d';' -f49 <<<"$line"); fi
    reqs=$((iops * RUNTIME))
    # perf stat -x, lines: value,unit,event,...
    awk -F, -v t="$target" -v q="$q" -v n="$name" -v iops="$iops" -v reqs="$reqs" -v hz="$hz" \
        -v srv=$((p1 - p0)) -v all=$((b1 - b0)) '
        FNR == NR { if ($3 != "") c[$3] = $1; next }
        { if ($3 != "") s[$3] = $1 }
        END {
            r = reqs > 0 ? reqs : 1
            printf "%-18s %2d %-18s %7d %8.1f %8.1f %6.2f %6.2f %7.2f  ioctl %.2f epoll_wait %.2f io_uring_enter %.2f sched_yield %.2f write %.2f read %.2f\n",
                t, q, n, iops, srv / hz / r * 1e6, all / hz / r * 1e6, c["context-switches"] / r,
                c["workqueue:workqueue_execute_start"] / r, s["raw_syscalls:sys_enter"] / r,
                s["syscalls:sys_enter_ioctl"] / r, s["syscalls:sys_enter_epoll_wait"] / r,
                s["syscalls:sys_enter_io_uring_enter"] / r, s["syscalls:sys_enter_sched_yield"] / r,
                s["syscalls:sys_enter_write"] / r, s["syscalls:sys_enter_read"] / r
        }' <(grep -v '^#' "$W/all.stat") <(grep -v '^#' "$W/srv.stat") | tee -a "$OUT/bench.frontend-counts"
}

: >"$OUT/bench.raw"
for round in $(seq 1 "$ROUNDS"); do
    echo "--- round $round" >&2
    for q in $COUNTS; do
        for t in "${TARGETS[@]}"; do
            up "$t" "$q"
            run_jobs "$t-q$q" "$DEV"
            down "$t"
        done
    done
done

echo "--- counting round (not in the medians)" >&2
printf '%-18s %2s %-18s %7s %8s %8s %6s %6s %7s  %s\n' target q job IOPS srv-cpu-us all-cpu-us cs wq srv-sys "server syscalls by kind, per request" \
    >"$OUT/bench.frontend-counts"
for q in $COUNTS; do
    for t in "${TARGETS[@]}"; do
        up "$t" "$q"
        for j in "${JOBS[@]}"; do counted "$t" "$q" "$j"; done
        down "$t"
    done
done

echo "--- perf round (not in the medians)" >&2
: >"$OUT/bench.frontend-perf"
for t in "${TARGETS[@]}"; do
    [[ $t == vduse-null-nopoll || $t == vduse-null-irq1 ]] && continue
    up "$t" 1
    for j in "${JOBS[0]}" "${JOBS[1]}"; do
        read -r name rw bs qd _ <<<"$j"
        fio --name="$name" --filename="$DEV" --ioengine=libaio --direct=1 --size="${SIZE_MB}M" \
            --rw="$rw" --bs="$bs" --iodepth="$qd" --runtime="$RUNTIME" \
            --ramp_time=1 --time_based --randrepeat=0 --norandommap --output-format=terse --terse-version=3 >/dev/null &
        fio_pid=$!
        sleep 1
        perf record -q -a -g -e cpu-clock -o "$W/perf.data" -- sleep "$RUNTIME" 2>/dev/null
        wait "$fio_pid"
        {
            echo "=== $t, 1 queue, $name: CPU by thread (both vCPUs), then the hottest functions"
            perf report -i "$W/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 12
            perf report -i "$W/perf.data" --no-children --sort comm,sym --stdio -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | head -n 40
        } >>"$OUT/bench.frontend-perf"
    done
    down "$t"
done

# IOPS medians: a row per job and queue count, a column per target.
awk -v targets="${TARGETS[*]}" -v counts="$COUNTS" '
function median(key,    n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? a[int((n + 1) / 2)] : 0
}
{ vals[$1" "$2] = vals[$1" "$2] " " $3; if (!seen[$2]++) order[n++] = $2 }
END {
    nt = split(targets, T, " "); nc = split(counts, C, " ")
    printf "%-18s %2s", "job", "q"; for (k = 1; k <= nt; k++) printf " %18s", T[k]; printf " %14s\n", "null/rublknull"
    for (c = 1; c <= nc; c++) for (i = 0; i < n; i++) {
        j = order[i]; printf "%-18s %2d", j, C[c]
        for (k = 1; k <= nt; k++) printf " %18d", median(T[k]"-q"C[c]" "j)
        r = median("rublk-null-q"C[c]" "j); printf " %13.2fx\n", r ? median("vduse-null-q"C[c]" "j) / r : 0
    }
}' "$OUT/bench.raw" | tee "$OUT/bench.frontend"
