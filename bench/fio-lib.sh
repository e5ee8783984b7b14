# Sourced by the guest benchmark scripts: one fio job on one device, its figures appended to
# $OUT/bench.raw. Needs OUT, RUNTIME (2 or more) and SIZE_MB. With FIO_CPU set (a taskset CPU
# list), fio runs on those CPUs, and the CPU time every vCPU spent busy while fio counted is
# appended to $OUT/bench.cpu too, per 100k requests, and the guest's context switches over the
# same time to $OUT/bench.ctxt, per request.
#
# With GUEST_CPU set instead, fio is not pinned, and the busy time of all vCPUs together goes to
# bench.cpu as "PEER NAME guest SECONDS_PER_100K".
#
# With FIO_CPU, run_jobs also takes off what the guest does while the device is idle
# (idle_rates). GUEST_CPU's figures are not net of it: at the thousands of IOPS of the main
# bench, the guest's background is a few percent of a request's share.
#
# The CPU is sampled well inside the span fio counts, from 2 s after its start to 0.5 s before
# its end, and divided by the requests fio ran in that time (its average IOPS times the time
# measured): a process's start and exit cost CPU that no request does (in a TCG guest a fork
# and exec alone take tens of milliseconds, and fio's librbd engine connects to the cluster
# and shuts librados down), and at a few hundred IOPS they would add a millisecond to each
# request's share.

if ((RUNTIME < 2)); then
    echo "fio-lib: RUNTIME must be 2 seconds or more (the CPU is sampled from 2 s in), not $RUNTIME" >&2
    exit 1
fi

# cpu_busy: "CPU BUSY_TICKS" per vCPU, from /proc/stat (busy: all but idle and iowait)
cpu_busy() {
    awk '$1 ~ /^cpu[0-9]+$/ { print substr($1, 4), $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

# ctxt: the guest's context switches since boot, every CPU
ctxt() {
    awk '$1 == "ctxt" { print $2 }' /proc/stat
}

# uptime_cs: the guest's uptime in centiseconds
uptime_cs() {
    awk '{ printf "%d\n", $1 * 100 }' /proc/uptime
}

# proc_cpu PID: user + system clock ticks of the whole process, all its threads
proc_cpu() {
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# run_job PEER DEV "NAME RW BS IODEPTH NUMJOBS": appends "PEER NAME IOPS MiB/s" to bench.raw
# and, with FIO_CPU, "PEER NAME CPU SECONDS_PER_100K" per vCPU to bench.cpu and "PEER NAME
# SWITCHES_PER_REQUEST" to bench.ctxt. DEV is a block
# device, or rbd:POOL/IMAGE for fio's own librbd engine (no block device: the userspace
# client's ceiling), which reads the cluster from $CEPH_CONF. With PERF_JOBS listing NAME,
# the whole guest is sampled (perf, cpu-clock) while fio counts, into $OUT/perf-PEER-NAME.data
# (a "/" in PEER becomes "_").
# With SERVER_PID set, that process's CPU time (all threads, user + system) while fio counts is
# appended to bench.cpu as "PEER NAME srv SECONDS_PER_100K".
# A job still running BENCH_STALL_SECONDS (120) after its time is up has stalled: if the
# sourcing script defines stall_report, it is called once then, with PEER NAME, to keep what the
# guest knows of the stall before the guest (and its logs) go; then fio is killed, the job's
# line in bench.raw says "stalled", and the script exits 1.
run_job() {
    local peer=$1 dev=$2 name rw bs qd jobs line iops kib pin=() before after fio_pid target perf_pid= srv0= srv1=
    local watchdog= fio_rc=0 ctxt0= ctxt1= t0= t1=
    read -r name rw bs qd jobs <<<"$3"
    [[ -n ${FIO_CPU:-} ]] && pin=(taskset -c "$FIO_CPU")
    if [[ $dev == rbd:* ]]; then
        dev=${dev#rbd:}
        target=(--ioengine=rbd --clientname=admin --pool="${dev%%/*}" --rbdname="${dev#*/}")
    else
        target=(--filename="$dev" --ioengine=libaio --direct=1 --size="${SIZE_MB}M")
    fi
    "${pin[@]}" fio --name="$name" "${target[@]}" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs="$jobs" --group_reporting --runtime="$RUNTIME" --ramp_time=1 \
        --time_based --randrepeat=0 --norandommap --output-format=terse \
        --terse-version=3 >"$OUT/fio.out" &
    fio_pid=$!
    if [[ " ${PERF_JOBS:-} " == *" $name "* ]]; then
        # fio counts after its 1 s ramp, for RUNTIME seconds: perf samples the same.
        sleep 1
        perf record -q -a -g -e cpu-clock -o "$OUT/perf-${peer//\//_}-$name.data" -- sleep "$RUNTIME" 2>/dev/null &
        perf_pid=$!
    fi
    if declare -F stall_report >/dev/null; then
        # A stalled job is reported, then killed, and the run stops: what follows would run on
        # whatever stalled this one, and the guest would otherwise wait out its whole timeout.
        # It exits 0 only when it has reported the stall and killed fio. Its stderr is fd 3
        # inside: bash would print "Terminated" when run_job ends its sleep.
        (exec 3>&2 2>/dev/null
            sleep $((RUNTIME + 1 + ${BENCH_STALL_SECONDS:-120})) && kill -0 "$fio_pid" &&
            echo "fio's $name on $peer has not ended: stalled; stall_report runs" >&3 &&
            { stall_report "$peer" "$name" 2>&3; kill -KILL "$fio_pid"; }) &
        watchdog=$!
    fi
    if [[ -n ${FIO_CPU:-} || -n ${SERVER_PID:-} || -n ${GUEST_CPU:-} ]]; then
        # 2 s after fio's start (perf's start slept the first one).
        if [[ -n $perf_pid ]]; then sleep 1; else sleep 2; fi
        t0=$(uptime_cs)
        [[ -n ${FIO_CPU:-}${GUEST_CPU:-} ]] && { before=$(cpu_busy); ctxt0=$(ctxt); }
        [[ -n ${SERVER_PID:-} ]] && srv0=$(proc_cpu "$SERVER_PID")
        sleep "$((RUNTIME - 2)).5"
        t1=$(uptime_cs)
        [[ -n ${FIO_CPU:-}${GUEST_CPU:-} ]] && { after=$(cpu_busy); ctxt1=$(ctxt); }
        [[ -n ${SERVER_PID:-} ]] && srv1=$(proc_cpu "$SERVER_PID")
    fi
    # Under the callers' `set -e` a bare wait would end the script on the killed fio's status,
    # before the stall is said.
    wait "$fio_pid" || fio_rc=$?
    if [[ -n $watchdog ]]; then
        # fio ended: so does the watchdog's sleep, and the watchdog with it, without reporting.
        pkill -P "$watchdog" sleep 2>/dev/null || true
        if wait "$watchdog"; then
            echo "$peer $name stalled" | tee -a "$OUT/bench.raw"
            echo "the run stops: fio's $name on $peer stalled (see $OUT/stall-$peer-$name.txt)" >&2
            exit 1
        fi
    fi
    ((fio_rc == 0)) || return "$fio_rc"
    [[ -n $perf_pid ]] && { wait "$perf_pid" || true; }
    line=$(cat "$OUT/fio.out")
    if [[ $rw == *read ]]; then
        kib=$(cut -d';' -f7 <<<"$line"); iops=$(cut -d';' -f8 <<<"$line")
    else
        kib=$(cut -d';' -f48 <<<"$line"); iops=$(cut -d';' -f49 <<<"$line")
    fi
    echo "$peer $name $iops $((kib / 1024))" | tee -a "$OUT/bench.raw"
    # Requests in the sampled span: fio's average IOPS times the span, in seconds.
    local span
    span=$(awk -v d=$((t1 - t0)) 'BEGIN { print d / 100 }')
    if [[ -n $srv0 && -n $srv1 ]]; then
        awk -v p="$peer" -v n="$name" -v iops="$iops" -v t="$span" -v hz="$(getconf CLK_TCK)" -v d=$((srv1 - srv0)) \
            'BEGIN { printf "%s %s srv %.3f\n", p, n, (iops > 0 ? d / hz / (iops * t) * 100000 : 0) }' >>"$OUT/bench.cpu"
    fi
    if [[ -n ${FIO_CPU:-}${GUEST_CPU:-} ]]; then
        # Ticks are USER_HZ: per vCPU with FIO_CPU, all vCPUs together ("guest") with GUEST_CPU;
        # net of the idle rates (run_jobs, FIO_CPU only), never below zero.
        join <(echo "$before") <(echo "$after") | awk -v p="$peer" -v n="$name" -v iops="$iops" \
            -v t="$span" -v hz="$(getconf CLK_TCK)" -v idle="${IDLE_CPU:-}" -v each="${FIO_CPU:+1}" '
            function share(d) { if (d < 0) d = 0; return iops > 0 ? d / hz / (iops * t) * 100000 : 0 }
            BEGIN { m = split(idle, f, "\n"); for (i = 1; i <= m; i++) { split(f[i], g, " "); rate[g[1]] = g[2] } }
            {
                d = $3 - $2 - rate[$1] * t; sum += d
                if (each) printf "%s %s cpu%s %.3f\n", p, n, $1, share(d)
            }
            END { if (!each) printf "%s %s guest %.3f\n", p, n, share(sum) }' >>"$OUT/bench.cpu"
    fi
    if [[ -n ${FIO_CPU:-} ]]; then
        awk -v p="$peer" -v n="$name" -v iops="$iops" -v t="$span" -v d=$((ctxt1 - ctxt0)) -v idle="${IDLE_CTXT:-0}" \
            'BEGIN { d -= idle * t; if (d < 0) d = 0; printf "%s %s %.2f\n", p, n, (iops > 0 ? d / (iops * t) : 0) }' \
            >>"$OUT/bench.ctxt"
    fi
}

# idle_rates PEER: the guest's busy ticks per second of each vCPU and its context switches per
# second, over 2 s with PEER's device up and idle, into IDLE_CPU ("CPU RATE" lines) and
# IDLE_CTXT for run_job to take off each job's figures, and into $OUT/bench.idle.
idle_rates() {
    local t0 t1 b0 b1 c0 c1
    t0=$(uptime_cs); b0=$(cpu_busy); c0=$(ctxt)
    sleep 2
    t1=$(uptime_cs); b1=$(cpu_busy); c1=$(ctxt)
    IDLE_CPU=$(join <(echo "$b0") <(echo "$b1") | awk -v d=$((t1 - t0)) '{ printf "%s %.3f\n", $1, ($3 - $2) / (d / 100) }')
    IDLE_CTXT=$(awk -v c=$((c1 - c0)) -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", c / (d / 100) }')
    echo "$1 idle: $IDLE_CTXT context switches/s, busy ticks/s per vCPU: $(tr '\n' ' ' <<<"$IDLE_CPU")" >>"$OUT/bench.idle"
}

# run_jobs PEER DEV: every job of $JOBS. With FIO_CPU, the device's idle rates are measured
# first (idle_rates) and each job's CPU and context switches are net of them: what the guest
# does anyway (timers, the device's own housekeeping, the OSD's background work) is not a
# request's cost, and at a few hundred IOPS it would be a large share of the figure.
run_jobs() {
    local j
    IDLE_CPU='' IDLE_CTXT=0
    if [[ -n ${FIO_CPU:-} ]]; then idle_rates "$1"; fi
    for j in "${JOBS[@]}"; do run_job "$1" "$2" "$j"; done
}
