#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest (started by bench/run.sh): the same fio jobs on the same image
# through three block devices, one after another in this one boot:
#   vduse-csi   our `vduse-csi device serve`
#   qsd         qemu-storage-daemon --export vduse-blk (QEMU's C implementation)
#   loop        the kernel loop device with direct I/O (the in-kernel ceiling)
# and prints one table. Everything in the guest is emulated (TCG): compare ratios, not
# absolute figures.
set -euo pipefail

BIN=${VDUSE_CSI_BIN:?}
OUT=${GUEST_OUT_DIR:?}
RUNTIME=${BENCH_RUNTIME:-8}
SIZE_MB=${BENCH_SIZE_MB:-512}
QUEUES=${BENCH_QUEUES:-1}
PEERS=${BENCH_PEERS:-vduse-csi qsd loop}
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
W=/tmp/bench
mkdir -p "$W"
img=$W/bench.img
# Fill the whole image so reads hit data, not holes.
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MB" status=none

# name rw bs iodepth
JOBS=(
    "randread-4k-qd1 randread 4k 1"
    "randread-4k-qd32 randread 4k 32"
    "randwrite-4k-qd1 randwrite 4k 1"
    "randwrite-4k-qd32 randwrite 4k 32"
    "read-1m-qd8 read 1M 8"
    "write-1m-qd8 write 1M 8"
)

# run_jobs PEER DEV: one line per job: PEER JOB IOPS MiB/s
run_jobs() {
    local peer=$1 dev=$2 j name rw bs qd line iops kib
    for j in "${JOBS[@]}"; do
        read -r name rw bs qd <<<"$j"
        line=$(fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
            --iodepth="$qd" --runtime="$RUNTIME" --ramp_time=1 --time_based --size="${SIZE_MB}M" \
            --randrepeat=0 --norandommap --output-format=terse --terse-version=3)
        if [[ $rw == *read ]]; then
            kib=$(cut -d';' -f7 <<<"$line"); iops=$(cut -d';' -f8 <<<"$line")
        else
            kib=$(cut -d';' -f48 <<<"$line"); iops=$(cut -d';' -f49 <<<"$line")
        fi
        echo "$peer $name $iops $((kib / 1024))" | tee -a "$OUT/bench.raw"
    done
}

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

: >"$OUT/bench.raw"

peer() { [[ " $PEERS " == *" $1 "* ]]; }

# 1. vduse-csi
if peer vduse-csi; then
"$BIN" device serve --image "$img" --name bench0 --queues "$QUEUES" --log-level warn >"$W/ours.out" &
pid=$!
for i in $(seq 1 600); do [[ -s $W/ours.out ]] && break; sleep 0.1; done
dev=$(head -n1 "$W/ours.out")
run_jobs vduse-csi "$dev"
kill -TERM "$pid"; wait "$pid"
fi

# 2. qemu-storage-daemon vduse-blk export
if peer qsd; then
qemu-storage-daemon --blockdev "file,filename=$img,node-name=d0" \
    --export "vduse-blk,id=e0,node-name=d0,name=qsd0,num-queues=$QUEUES,writable=on,queue-size=256" &
qsd=$!
for i in $(seq 1 100); do [[ -e /sys/class/vduse/qsd0 ]] && break; sleep 0.1; done
vdpa dev add name qsd0 mgmtdev vduse
dev=$(wait_block qsd0)
run_jobs qsd "$dev"
vdpa dev del qsd0
kill -TERM "$qsd"; wait "$qsd" || true
fi

# 3. loop device, direct I/O
if peer loop; then
dev=$(losetup --direct-io=on -f --show "$img")
run_jobs loop "$dev"
losetup -d "$dev"
fi

# Table: per job, each peer's IOPS and MiB/s, and our ratio to each peer (IOPS).
awk '
{ iops[$1" "$2]=$3; mib[$1" "$2]=$4; if (!seen[$2]++) order[n++]=$2 }
END {
    printf "%-18s %12s %9s %12s %9s %12s %9s %10s %10s\n", "job", "vduse-csi", "MiB/s", "qsd", "MiB/s", "loop", "MiB/s", "vs qsd", "vs loop"
    for (i = 0; i < n; i++) {
        j = order[i]; o = iops["vduse-csi "j]; q = iops["qsd "j]; l = iops["loop "j]
        printf "%-18s %12d %9d %12d %9d %12d %9d %9.2fx %9.2fx\n", j, o, mib["vduse-csi "j], q, mib["qsd "j], l, mib["loop "j], (q ? o/q : 0), (l ? o/l : 0)
    }
}' "$OUT/bench.raw" | tee "$OUT/bench.table"
