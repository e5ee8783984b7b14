#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh with BENCH_FRONTEND=1): what the
# frontends cost with the storage taken out, at several queue counts, in one boot.
#   vduse-null         our `device serve --null` (the kernel's VDUSE path + our queue engine),
#                      which binds each virtqueue's interrupt to one CPU of its mask
#   vduse-null-rotate  the same with --rotate-irqs: VDUSE moves every injected interrupt to
#                      the next CPU of the mask (with one queue, every other completion runs
#                      on the other vCPU)
#   vduse-null-nopoll  the same as vduse-null with --poll-us 0 (never polls the ring)
#   vduse-null-rq0     vduse-null with the disk's rq_affinity at 0 (blk-mq completes where
#                      the interrupt runs, never on the submitting CPU)
#   vduse-null-rq2     vduse-null with rq_affinity at 2 (always on the submitting CPU)
#   vduse-null-apart   vduse-null with each queue thread kept off the CPU its interrupt is
#                      bound to (taskset after start)
#   rublk-null         rublk's null target (the kernel's ublk path + rublk's queue loop)
# Each at every count of FRONTEND_QUEUES (default "1 2 4"). Interleaved rounds give IOPS
# medians (bench.frontend). Then one more round, not in the medians, counts per request
# over the span fio counts, from /proc:
#   srv-cpu-us   CPU time of the server process (all its threads, /proc/PID/stat)
#   all-cpu-us   CPU time of the whole guest, both vCPUs (/proc/stat, idle and iowait out)
#   cs           context switches, whole guest (/proc/stat ctxt)
#   srv-cs       context switches of the server's threads (/proc/PID/task/*/status)
# With FRONTEND_PERF_STAT=1 it also counts, with perf stat, the workqueue items run in the
# whole guest (a VDUSE interrupt is one: the kernel runs the virtqueue callback from a work
# item) and the server's system calls by kind. Off by default: enabling those events patches
# kernel text (tracepoint and perf static keys), and under TCG that crashed the guest's
# kernel in each of three boots (an int3 left in syscall_trace_enter or __schedule).
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

# name rw bs iodepth numjobs. The 1 MiB jobs add the kernel's bounce copy to the path (the
# null backend neither reads nor writes the data); FRONTEND_JOBS="NAME..." picks a subset.
JOBS=(
    "randread-4k-qd1 randread 4k 1 1"
    "randread-4k-qd32 randread 4k 32 1"
    "randread-4k-2x32 randread 4k 32 2"
    "read-1m-qd8 read 1m 8 1"
    "write-1m-qd8 write 1m 8 1"
)
if [[ -n ${FRONTEND_JOBS:-} ]]; then
    picked=()
    for j in "${JOBS[@]}"; do [[ " $FRONTEND_JOBS " == *" ${j%% *} "* ]] && picked+=("$j"); done
    ((${#picked[@]})) || { echo "FRONTEND_JOBS=$FRONTEND_JOBS names no job" >&2; exit 1; }
    JOBS=("${picked[@]}")
fi
# shellcheck source=bench/fio-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/fio-lib.sh"

# Events perf stat counts: only those this kernel has (an unknown one fails the whole stat).
usable() { # EVENT... -> the usable ones, comma-separated
    local e ok=()
    for e in "$@"; do perf stat -e "$e" -- true >/dev/null 2>&1 && ok+=("$e"); done
    local IFS=,
    echo "${ok[*]}"
}
PERF_STAT=${FRONTEND_PERF_STAT:-0}
if [[ $PERF_STAT != 0 ]]; then
    ALL_EVENTS=$(usable workqueue:workqueue_execute_start)
    SRV_EVENTS=$(usable raw_syscalls:sys_enter syscalls:sys_enter_ioctl syscalls:sys_enter_epoll_wait \
        syscalls:sys_enter_io_uring_enter syscalls:sys_enter_sched_yield)
    echo "perf stat events: whole guest: $ALL_EVENTS; server: $SRV_EVENTS" >&2
fi

SERVER_PID=
# up TARGET QUEUES: brings TARGET up; sets DEV and SERVER_PID
up() {
    local i
    case $1 in
    vduse-null*)
        local extra=()
        [[ $1 == vduse-null-nopoll ]] && extra=(--poll-us 0)
        [[ $1 == vduse-null-rotate ]] && extra=(--rotate-irqs)
        "$BIN" device serve --null --size "${SIZE_MB}M" --name fe0 --queues "$2" --log-level warn "${extra[@]}" >"$W/ours.out" &
        SERVER_PID=$!
        for i in $(seq 1 600); do [[ -s $W/ours.out ]] && break; sleep 0.1; done
        DEV=$(head -n1 "$W/ours.out")
        case $1 in
        vduse-null-apart)
            local tid cpu all mask
            all=$(seq -s, 0 $(($(nproc) - 1)))
            for tid in /proc/"$SERVER_PID"/task/*; do
                [[ $(cat "$tid/comm") =~ ^vduse-q([0-9]+) ]] || continue
                mask=$(tr -d ',' <"/sys/class/vduse/fe0/vq${BASH_REMATCH[1]}/irq_cb_affinity")
                for cpu in $(seq 0 $(($(nproc) - 1))); do (((16#$mask >> cpu) & 1)) && break; done
                taskset -p -c "$(tr ',' '\n' <<<"$all" | grep -vx "$cpu" | paste -sd,)" "${tid##*/}" >/dev/null
            done
            ;;
        vduse-null-rq0) echo 0 >"/sys/block/${DEV#/dev/}/queue/rq_affinity" ;;
        vduse-null-rq2) echo 2 >"/sys/block/${DEV#/dev/}/queue/rq_affinity" ;;
        esac
        echo "$1 q$2: interrupts $(grep -H . /sys/class/vduse/fe0/vq*/irq_cb_affinity | sed 's|.*/vq|vq|' | tr '\n' ' ')rq_affinity $(cat "/sys/block/${DEV#/dev/}/queue/rq_affinity")" >&2
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

TARGETS=(${FRONTEND_TARGETS:-vduse-null vduse-null-rotate vduse-null-nopoll vduse-null-rq0 vduse-null-rq2})
command -v rublk >/dev/null && [[ -e /dev/ublk-control ]] && TARGETS+=(rublk-null)

busy_ticks() { # all vCPUs' busy ticks (fio-lib.sh's cpu_busy, summed)
    cpu_busy | awk '{ s += $2 } END { print s }'
}
server_switches() { # PID -> context switches of all its threads
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}

# counted TARGET Q JOB: one fio run, counted over its measured span; appends a line of
# per-request figures to bench.frontend-counts.
counted() {
    local target=$1 q=$2 name rw bs qd jobs fio_pid stat_pids=() p0 p1 b0 b1 c0 c1 s0 s1 line iops reqs hz
    read -r name rw bs qd jobs <<<"$3"
    hz=$(getconf CLK_TCK)
    fio --name="$name" --filename="$DEV" --ioengine=libaio --direct=1 --size="${SIZE_MB}M" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs="$jobs" --group_reporting --runtime="$RUNTIME" --ramp_time=1 --time_based \
        --randrepeat=0 --norandommap --output-format=terse --terse-version=3 >"$W/fio.out" &
    fio_pid=$!
    sleep 1
    p0=$(proc_cpu "$SERVER_PID"); b0=$(busy_ticks); c0=$(ctxt); s0=$(server_switches "$SERVER_PID")
    : >"$W/all.stat"
    : >"$W/srv.stat"
    if [[ $PERF_STAT != 0 ]]; then
        perf stat -x, -o "$W/all.stat" -a -e "$ALL_EVENTS" -- sleep "$RUNTIME" &
        stat_pids+=($!)
        perf stat -x, -o "$W/srv.stat" -p "$SERVER_PID" -e "$SRV_EVENTS" -- sleep "$RUNTIME" &
        stat_pids+=($!)
    fi
    # Not a bare `wait`: our server is a child of this shell too.
    wait "$fio_pid" "${stat_pids[@]}"
    p1=$(proc_cpu "$SERVER_PID"); b1=$(busy_ticks); c1=$(ctxt); s1=$(server_switches "$SERVER_PID")
    line=$(cat "$W/fio.out")
    if [[ $rw == *read ]]; then iops=$(cut -d';' -f8 <<<"$line"); else iops=$(cut -d';' -f49 <<<"$line"); fi
    reqs=$((iops * RUNTIME))
    # perf stat -x, lines: value,unit,event,...
    awk -F, -v t="$target" -v q="$q" -v n="$name" -v iops="$iops" -v reqs="$reqs" -v hz="$hz" \
        -v srv=$((p1 - p0)) -v all=$((b1 - b0)) -v cs=$((c1 - c0)) -v scs=$((s1 - s0)) -v perf="$PERF_STAT" '
        FNR == NR { if ($3 != "") c[$3] = $1; next }
        { if ($3 != "") s[$3] = $1 }
        END {
            r = reqs > 0 ? reqs : 1
            printf "%-18s %2d %-18s %7d %8.1f %8.1f %6.2f %6.2f", t, q, n, iops, srv / hz / r * 1e6, all / hz / r * 1e6, cs / r, scs / r
            if (perf != 0)
                printf "  wq %.2f syscalls %.2f: ioctl %.2f epoll_wait %.2f io_uring_enter %.2f sched_yield %.2f",
                    c["workqueue:workqueue_execute_start"] / r, s["raw_syscalls:sys_enter"] / r,
                    s["syscalls:sys_enter_ioctl"] / r, s["syscalls:sys_enter_epoll_wait"] / r,
                    s["syscalls:sys_enter_io_uring_enter"] / r, s["syscalls:sys_enter_sched_yield"] / r
            printf "\n"
        }' "$W/all.stat" "$W/srv.stat" | tee -a "$OUT/bench.frontend-counts"
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
    [[ $t == vduse-null || $t == rublk-null ]] || continue
    up "$t" 1
    for j in "${JOBS[@]:0:2}"; do
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
            # sed -n reads to the end: `head` would leave perf report a SIGPIPE (pipefail)
            perf report -i "$W/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | sed -n 1,12p
            perf report -i "$W/perf.data" --no-children --sort comm,sym --stdio -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | sed -n 1,40p
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
