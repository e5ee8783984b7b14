#!/usr/bin/env bash
# Kernel-facing tests of `vduse-csi device serve`, run INSIDE the VDUSE guest by
# tests/guest.rs (through tests/guest/run.sh). Each test is a function run in its
# own subshell; its verdict goes to $GUEST_OUT_DIR/results as
#   RESULT <name> PASS|FAIL <seconds>
# and its log to $GUEST_OUT_DIR/<name>.log. The host side asserts on those lines.
#
# Usage: device-tests.sh [TEST...]   (default: all)
# Needs: VDUSE_CSI_BIN (the binary under test), GUEST_OUT_DIR (set by run.sh).
set -uo pipefail

BIN=${VDUSE_CSI_BIN:?set VDUSE_CSI_BIN to the vduse-csi binary}
OUT=${GUEST_OUT_DIR:?not running under tests/guest/run.sh}
WORK=/tmp/vduse-tests
mkdir -p "$WORK"
: >"$OUT/results"
# bash process substitution needs /dev/fd, which a bare devtmpfs lacks.
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd

# --- helpers -----------------------------------------------------------------

# start_server NAME IMAGE [ARGS...]: starts `device serve` in the background and
# waits for the block device path on its stdout. Sets SERVER_PID and DEV.
start_server() {
    local name=$1 image=$2
    shift 2
    local log=$WORK/$name.$$.$RANDOM
    "$BIN" device serve --image "$image" --name "$name" "$@" >"$log.out" 2>"$log.err" &
    SERVER_PID=$!
    SERVER_LOG=$log
    local i
    for i in $(seq 1 1200); do
        if [[ -s $log.out ]]; then
            DEV=$(head -n1 "$log.out")
            echo "server $name (pid $SERVER_PID) serves $DEV"
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server $name exited before the device came up:"
            cat "$log.err"
            return 1
        fi
        sleep 0.1
    done
    echo "server $name: no device after 120 s"
    cat "$log.err"
    return 1
}

# stop_server: SIGTERM, and the server must exit 0.
stop_server() {
    kill -TERM "$SERVER_PID"
    local rc=0
    wait "$SERVER_PID" || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "server exited with $rc:"
        cat "$SERVER_LOG.err"
        return 1
    fi
}

# gone NAME: no trace of the device on the host any more.
gone() {
    [[ ! -e /sys/class/vduse/$1 && ! -e /sys/bus/vdpa/devices/$1 && ! -e /dev/vduse/$1 ]]
}

allocated_kib() { du -k "$1" | cut -f1; }

expect_fail() {
    if "$@"; then
        echo "expected failure, but succeeded: $*"
        return 1
    fi
}

# --- tests ---------------------------------------------------------------------

# mkfs.ext4 + mount + files + unmount + stop + restart on the same image: same data.
test_fs_persists_across_restart() {
    local img=$WORK/fs.img mnt=$WORK/mnt
    mkdir -p "$mnt"
    start_server fs0 "$img" --size 512M
    [[ $(cat "/sys/block/${DEV#/dev/}/serial") == fs0 ]] # GET_ID answers the device name
    mkfs.ext4 -q "$DEV"
    mount "$DEV" "$mnt"
    dd if=/dev/urandom of="$mnt/big" bs=1M count=48 status=none
    for i in $(seq 1 50); do head -c $((i * 1000)) /dev/urandom >"$mnt/small-$i"; done
    mkdir -p "$mnt/dir/sub" && echo hello >"$mnt/dir/sub/file"
    (cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/sums"
    umount "$mnt"
    stop_server
    gone fs0
    start_server fs0 "$img"
    mount "$DEV" "$mnt"
    (cd "$mnt" && sha256sum --quiet -c "$WORK/sums")
    umount "$mnt"
    fsck.ext4 -fn "$DEV" >/dev/null
    stop_server
    gone fs0
}

# fio with verification on the raw device: 4k random writes at QD32, 1M sequential.
test_fio_verify() {
    local img=$WORK/fio.img
    start_server fio0 "$img" --size 256M
    fio --name=rand4k --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=32 --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --randrepeat=0 --output-format=terse >/dev/null
    fio --name=seq1m --filename="$DEV" --ioengine=libaio --direct=1 --rw=write --bs=1M \
        --iodepth=8 --size=192M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output-format=terse >/dev/null
    stop_server
    gone fio0
}

# Multiple queues: the host spreads I/O over them; data stays correct.
test_multiqueue_verify() {
    local img=$WORK/mq.img
    start_server mq0 "$img" --size 128M --queues 2 --queue-size 128
    local nq
    nq=$(ls "/sys/block/${DEV#/dev/}/mq" | wc -l)
    echo "blk-mq hardware queues: $nq"
    [[ $nq -eq 2 ]]
    fio --name=mq --filename="$DEV" --ioengine=libaio --direct=1 --rw=randrw --bs=4k \
        --iodepth=16 --numjobs=2 --size=32M --offset_increment=48M --verify=crc32c \
        --verify_fatal=1 --do_verify=1 --randrepeat=0 --group_reporting --output-format=terse >/dev/null
    stop_server
}

# fstrim punches holes in the image: its allocated size shrinks.
test_fstrim_shrinks_image() {
    local img=$WORK/trim.img mnt=$WORK/trim
    mkdir -p "$mnt"
    start_server trim0 "$img" --size 512M
    mkfs.ext4 -q "$DEV"
    mount "$DEV" "$mnt"
    dd if=/dev/urandom of="$mnt/fill" bs=1M count=128 conv=fsync status=none
    sync
    local before after
    before=$(allocated_kib "$img")
    rm "$mnt/fill"
    sync
    fstrim -v "$mnt"
    sync
    after=$(allocated_kib "$img")
    echo "image allocation: ${before} KiB before, ${after} KiB after fstrim"
    ((after + 100 * 1024 <= before))
    umount "$mnt"
    # WRITE_ZEROES and DISCARD on the raw device as well.
    blkdiscard -f -o 0 -l 16M "$DEV"
    blkdiscard -f -z -o 16M -l 16M "$DEV"
    [[ $(head -c 32M "$DEV" | tr -d '\0' | wc -c) -eq 0 ]]
    stop_server
}

# I/O past the end fails in the host, and the device keeps serving afterwards.
test_out_of_range_fails_and_device_keeps_serving() {
    local img=$WORK/oor.img
    start_server oor0 "$img" --size 64M
    local sectors
    sectors=$(blockdev --getsz "$DEV")
    [[ $sectors -eq $((64 * 2048)) ]]
    expect_fail dd if=/dev/zero of="$DEV" bs=512 seek="$sectors" count=1 oflag=direct status=none
    # A read at the end returns nothing (EOF), not data.
    [[ $(dd if="$DEV" bs=512 skip="$sectors" count=1 iflag=direct status=none | wc -c) -eq 0 ]]
    head -c 4096 /dev/urandom >"$WORK/oor.pat"
    dd if="$WORK/oor.pat" of="$DEV" bs=4096 seek=$(((sectors / 8) - 1)) oflag=direct status=none
    cmp <(dd if="$DEV" bs=4096 skip=$(((sectors / 8) - 1)) count=1 iflag=direct status=none) "$WORK/oor.pat"
    stop_server
}

# A read-only device: the host sees it read-only and writes fail; reads work.
test_read_only() {
    local img=$WORK/ro.img
    head -c 1M /dev/urandom >"$WORK/ro.pat"
    truncate -s 32M "$img"
    dd if="$WORK/ro.pat" of="$img" conv=notrunc status=none
    start_server ro0 "$img" --read-only
    [[ $(blockdev --getro "$DEV") -eq 1 ]]
    expect_fail dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct status=none
    cmp <(head -c 1M "$DEV") "$WORK/ro.pat"
    stop_server
}

# SIGKILL during writes: the next `device serve` of the same name takes the device
# over, the blocked writer finishes, and the data is all there.
test_sigkill_then_restart_recovers() {
    local img=$WORK/kill.img
    head -c 32M /dev/urandom >"$WORK/kill.pat"
    start_server kill0 "$img" --size 64M
    local dev=$DEV
    dd if="$WORK/kill.pat" of="$dev" bs=64k oflag=direct status=none &
    local writer=$!
    sleep 1
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    # The writer must still be blocked on the dead server, or this proves nothing.
    sleep 1
    kill -0 "$writer"
    [[ -e /sys/class/vduse/kill0 ]]
    "$BIN" device list | tee "$WORK/list"
    grep -q '^kill0 ' "$WORK/list"
    start_server kill0 "$img"
    [[ $DEV == "$dev" ]]
    wait "$writer"
    cmp <(head -c 32M "$DEV") "$WORK/kill.pat"
    stop_server
    gone kill0
}

# `device remove` clears a device whose server was killed.
test_remove_stale_device() {
    local img=$WORK/stale.img
    start_server stale0 "$img" --size 16M
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    [[ -e /sys/bus/vdpa/devices/stale0 ]]
    expect_fail "$BIN" device remove no-such-device
    "$BIN" device remove stale0
    gone stale0
    "$BIN" device list | tee "$WORK/list"
    ! grep -q '^stale0 ' "$WORK/list"
}

# Bad command lines fail with a clear message and leave nothing behind.
test_bad_input_is_refused() {
    expect_fail "$BIN" device serve --image "$WORK/absent.img" 2>"$WORK/err"
    grep -q 'does not exist; pass --size' "$WORK/err"
    [[ ! -e $WORK/absent.img ]]
    expect_fail "$BIN" device serve --image "$WORK/x.img" --size 1M --name ../evil 2>"$WORK/err"
    grep -q 'invalid device name' "$WORK/err"
    expect_fail "$BIN" device serve --image "$WORK/x.img" --size 1M --queue-size 100 2>"$WORK/err"
    grep -q 'power of two' "$WORK/err"
    # A second server for a device that is being served is refused; the first keeps going.
    start_server busy0 "$WORK/busy.img" --size 16M
    expect_fail "$BIN" device serve --image "$WORK/busy.img" --name busy0 2>"$WORK/err"
    cat "$WORK/err"
    grep -q 'served by another process' "$WORK/err"
    dd if="$DEV" of=/dev/null bs=1M count=1 iflag=direct status=none
    stop_server
    gone busy0
}

# --- runner --------------------------------------------------------------------

run() {
    local name=$1 start=$SECONDS rc=0
    echo "=== $name"
    (
        set -euxo pipefail
        "test_$name"
    ) >"$OUT/$name.log" 2>&1 || rc=$?
    # Whatever the test left behind must not leak into the next one.
    pkill -KILL -f "$BIN device serve" 2>/dev/null || true
    sleep 0.2
    for d in $(ls /sys/class/vduse 2>/dev/null | grep -v '^control$'); do
        "$BIN" device remove "$d" >>"$OUT/$name.log" 2>&1 || true
    done
    umount -q "$WORK"/* 2>/dev/null || true
    rm -f "$WORK"/*.img
    local verdict=PASS
    [[ $rc -eq 0 ]] || verdict=FAIL
    echo "RESULT $name $verdict $((SECONDS - start))" | tee -a "$OUT/results"
    if [[ $verdict == FAIL ]]; then tail -n 40 "$OUT/$name.log"; fi
}

tests=("$@")
if [[ ${#tests[@]} -eq 0 ]]; then
    mapfile -t tests < <(declare -F | awk '{print $3}' | sed -n 's/^test_//p')
fi
for t in "${tests[@]}"; do run "$t"; done
[[ -s $OUT/results ]] && ! grep -q ' FAIL ' "$OUT/results"
