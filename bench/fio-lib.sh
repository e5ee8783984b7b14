# Sourced by the guest benchmark scripts: one fio job on one device, its figures appended to
# $OUT/bench.raw. Needs OUT, RUNTIME and SIZE_MB.

# run_job PEER DEV "NAME RW BS IODEPTH NUMJOBS": appends "PEER NAME IOPS MiB/s" to bench.raw
run_job() {
    local peer=$1 dev=$2 name rw bs qd jobs line iops kib
    read -r name rw bs qd jobs <<<"$3"
    line=$(fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs="$jobs" --group_reporting --runtime="$RUNTIME" --ramp_time=1 \
        --time_based --size="${SIZE_MB}M" --randrepeat=0 --norandommap --output-format=terse \
        --terse-version=3)
    if [[ $rw == *read ]]; then
        kib=$(cut -d';' -f7 <<<"$line"); iops=$(cut -d';' -f8 <<<"$line")
    else
        kib=$(cut -d';' -f48 <<<"$line"); iops=$(cut -d';' -f49 <<<"$line")
    fi
    echo "$peer $name $iops $((kib / 1024))" | tee -a "$OUT/bench.raw"
}

# run_jobs PEER DEV: every job of $JOBS
run_jobs() {
    local j
    for j in "${JOBS[@]}"; do run_job "$1" "$2" "$j"; done
}
