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
# waits for the block device path on its stdout. Sets SERVER_PID and DEV. With
# SERVER_CMD_PREFIX (e.g. "taskset -c 1"), the server runs under that command.
start_server() {
    local name=$1 image=$2
    shift 2
    local log=$WORK/$name.$$.$RANDOM
    # shellcheck disable=SC2086 # SERVER_CMD_PREFIX is a command and its arguments
    ${SERVER_CMD_PREFIX:-} "$BIN" device serve --image "$image" --name "$name" "$@" >"$log.out" 2>"$log.err" &
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

# ext4_on_loop FILE DIR: a new 160 MiB ext4 in FILE, mounted on DIR through a loop device
# (where O_DIRECT is real, unlike tmpfs).
ext4_on_loop() {
    truncate -s 160M "$1"
    mkfs.ext4 -q "$1"
    mkdir -p "$2"
    mount -o loop "$1" "$2"
}

allocated_kib() { du -k "$1" | cut -f1; }

# expect_fail CMD...: succeeds when CMD fails (`! CMD` would never stop a `set -e` test).
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
    # Large enough that the writer is still running when the server dies (32 MiB took < 1 s).
    head -c 256M /dev/urandom >"$WORK/kill.pat"
    start_server kill0 "$img" --size 320M
    local dev=$DEV
    dd if="$WORK/kill.pat" of="$dev" bs=64k oflag=direct status=none &
    local writer=$!
    sleep 0.5
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
    cmp <(head -c 256M "$DEV") "$WORK/kill.pat"
    stop_server
    gone kill0
}

# kernel_errors_since N: kernel log lines after the first N that report I/O errors.
kernel_errors_since() {
    dmesg | tail -n +$(($1 + 1)) | grep -iE 'I/O error|blk_update_request|critical|Buffer I/O' || true
}

# verify_writer DEVICE OUTPUT SIZE [FIO_ARG...]: in the background (pid in FIO_PID), two fio
# jobs at QD32 write SIZE each at 4k-aligned random offsets of their own half of DEVICE and
# verify it (crc32c), failing at the first bad block.
verify_writer() {
    local dev=$1 out=$2 size=$3
    shift 3
    fio --name=writer --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --iodepth=32 \
        --numjobs=2 --size="$size" --offset_increment="$size" --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0 --group_reporting --output="$out" "$@" &
    FIO_PID=$!
}

# writer_verified OUTPUT KILLS WANT: the verify_writer in FIO_PID finished cleanly after WANT
# kills (KILLS were made), with no verify error.
writer_verified() {
    local rc=0
    wait "$FIO_PID" || rc=$?
    cat "$1"
    echo "fio exit $rc after $2 kills"
    [[ $rc -eq 0 && $2 -eq $3 ]]
    expect_fail grep -qi 'verify.*bad\|err= *[1-9]' "$1"
}

# kill_and_take_over NAME IMAGE [ARG...]: SIGKILL the server, then start NAME on IMAGE again;
# the device it takes over must be the same block device ($DEV before the kill).
kill_and_take_over() {
    local before=$DEV
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    echo "killed at $(date +%s.%N)"
    start_server "$@"
    [[ $DEV == "$before" ]]
}

# SIGKILL of the server five times while fio writes and verifies (2 queues, 2 jobs x QD32);
# each time a new server takes the device over. Zero verify errors, no I/O error in the
# kernel log: requests in flight when the server died are re-run by its successor.
test_kill9_under_fio_verify() {
    local img=$WORK/k9.img kernel_lines
    kernel_lines=$(dmesg | wc -l)
    start_server k90 "$img" --size 512M --queues 2
    local dev=$DEV
    [[ $(ls "/sys/block/${dev#/dev/}/mq" | wc -l) -eq 2 ]]
    verify_writer "$dev" "$WORK/k9.fio" 256M --bs=4k --io_size=240M --verify_backlog=2048
    local kills=0
    while ((kills < 5)); do
        sleep 1.5
        kill -0 "$FIO_PID" || break
        kill_and_take_over k90 "$img"
        kills=$((kills + 1))
    done
    writer_verified "$WORK/k9.fio" "$kills" 5
    local errors
    errors=$(kernel_errors_since "$kernel_lines")
    echo "kernel errors: ${errors:-none}"
    [[ -z $errors ]]
    stop_server
    gone k90
}

# cpus_of NAME QUEUE: the CPUs of the queue's interrupt mask, one per line.
cpus_of() {
    local mask cpu
    mask=$(tr -d ',' <"/sys/class/vduse/$1/vq$2/irq_cb_affinity")
    for cpu in $(seq 0 $(($(nproc) - 1))); do
        (((16#$mask >> cpu) & 1)) && echo "$cpu"
    done
    return 0
}

# A one-queue device on a node of several CPUs: its interrupt is bound to one CPU (VDUSE
# would otherwise move it to the other CPU at every completion), the binding holds through a
# SIGKILL and takeover under fio --verify, a server pinned with taskset binds to its own CPU,
# and --rotate-irqs leaves the kernel's whole mask.
test_irq_bound_to_one_cpu() {
    local kernel_lines
    kernel_lines=$(dmesg | wc -l)
    # Not a skip: with one CPU there is nothing to bind, and this test would prove nothing.
    (($(nproc) >= 2))
    start_server irq0 "$WORK/irq.img" --size 128M --queues 1
    echo "bound: $(cpus_of irq0 0 | paste -sd,)"
    [[ $(cpus_of irq0 0 | wc -l) -eq 1 ]]
    fio --name=irq --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
        --size=64M --verify=crc32c --verify_backlog=1024 --verify_fatal=1 --do_verify=1 --randrepeat=0 \
        --output="$WORK/irq.fio" &
    local fio_pid=$!
    sleep 1.5
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    start_server irq0 "$WORK/irq.img" --queues 1
    local rc=0
    wait "$fio_pid" || rc=$?
    cat "$WORK/irq.fio"
    [[ $rc -eq 0 ]]
    expect_fail grep -qi 'verify.*bad\|err= *[1-9]' "$WORK/irq.fio"
    [[ -z $(kernel_errors_since "$kernel_lines") ]]
    echo "bound after takeover: $(cpus_of irq0 0 | paste -sd,)"
    [[ $(cpus_of irq0 0 | wc -l) -eq 1 ]]
    stop_server
    gone irq0

    # Pinned to either end of the CPUs: the binding follows the pinning, not the name's hash.
    local cpu
    for cpu in 0 $(($(nproc) - 1)); do
        SERVER_CMD_PREFIX="taskset -c $cpu" start_server irq1 "$WORK/irq.img" --queues 1
        echo "pinned to CPU $cpu, bound: $(cpus_of irq1 0 | paste -sd,)"
        [[ $(cpus_of irq1 0) == "$cpu" ]]
        stop_server
    done

    start_server irq2 "$WORK/irq.img" --queues 1 --rotate-irqs
    echo "--rotate-irqs: $(cpus_of irq2 0 | paste -sd,)"
    [[ $(cpus_of irq2 0 | wc -l) -eq $(nproc) ]]
    stop_server
}

# SIGTERM while fio loads the device and dd writes: the server exits 0 within 5 s, and every
# write dd saw acknowledged is in the image.
test_sigterm_under_load() {
    local img=$WORK/term.img
    head -c 64M /dev/urandom >"$WORK/term.pat"
    start_server term0 "$img" --size 128M --queues 2
    local dev=$DEV
    fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --rw=randread --bs=4k \
        --iodepth=32 --numjobs=2 --offset=64M --size=64M --time_based --runtime=60 \
        --output="$WORK/term.fio" &
    local fio_pid=$!
    dd if="$WORK/term.pat" of="$dev" bs=64k oflag=direct 2>"$WORK/term.dd" &
    local dd_pid=$!
    sleep 2
    local t0 t1 rc=0
    t0=$(date +%s%N)
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || rc=$?
    t1=$(date +%s%N)
    echo "server exited $rc after $(((t1 - t0) / 1000000)) ms"
    wait "$dd_pid" || true
    wait "$fio_pid" || true
    cat "$WORK/term.dd"
    [[ $rc -eq 0 ]]
    (((t1 - t0) < 5000000000))
    local copied
    copied=$(sed -n 's/^\([0-9]*\) bytes.*copied.*/\1/p' "$WORK/term.dd")
    echo "dd acknowledged $copied bytes"
    [[ -n $copied && $copied -gt 0 ]]
    cmp -n "$copied" "$img" "$WORK/term.pat"
    gone term0
}

# A 1 MiB request reaches the server as one request: the host's limits allow it and the
# block layer counts one request per 1 MiB read or write.
test_one_mib_request_is_one_request() {
    local img=$WORK/big.img
    start_server big0 "$img" --size 64M
    local q=/sys/block/${DEV#/dev/}
    echo "max_sectors_kb=$(cat "$q/queue/max_sectors_kb") max_segments=$(cat "$q/queue/max_segments")"
    (($(cat "$q/queue/max_sectors_kb") >= 1024))
    (($(cat "$q/queue/max_segments") >= 257))
    # The bounce region was sized for every queue's ring full of the largest requests.
    local bounce
    bounce=$(cat /sys/class/vduse/big0/bounce_size)
    echo "bounce_size=$bounce"
    ((bounce >= 256 * 1024 * 1024))
    local r0 w0 r1 w1
    read -r r0 _ _ _ w0 _ <"$q/stat"
    dd if=/dev/urandom of="$WORK/big.pat" bs=1M count=16 status=none
    dd if="$WORK/big.pat" of="$DEV" bs=1M count=16 oflag=direct status=none
    cmp <(dd if="$DEV" bs=1M count=16 iflag=direct status=none) "$WORK/big.pat"
    read -r r1 _ _ _ w1 _ <"$q/stat"
    echo "requests for 16 x 1 MiB: $((w1 - w0)) writes, $((r1 - r0)) reads"
    [[ $((w1 - w0)) -eq 16 && $((r1 - r0)) -eq 16 ]]
    stop_server
}

# With the default cache mode, aligned requests use O_DIRECT and misaligned ones the page
# cache, on the same image: fio with every size from 512 bytes to 64 KiB at 512-byte
# alignment verifies, and so does the data read back after a restart. The image lives on
# ext4 (over a loop device), since on tmpfs the server uses the page cache on purpose.
test_odirect_misaligned_verify() {
    local fs=$WORK/dio.ext4 mnt=$WORK/dio
    ext4_on_loop "$fs" "$mnt"
    local img=$mnt/dio.img
    start_server dio0 "$img" --size 96M --cache none --log-level debug
    grep -q 'bypasses the page cache' "$SERVER_LOG.err"
    # Sizes and offsets in 512-byte steps (the block layer refuses O_DIRECT in smaller ones):
    # most requests are not 4 KiB-aligned, so the server sends them through the page cache.
    fio --name=mix --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite \
        --bsrange=512-64k --blockalign=512 --iodepth=16 --size=48M --verify_state_save=0 \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --output="$WORK/dio.fio"
    dd if=/dev/urandom of="$WORK/dio.pat" bs=1M count=8 status=none
    # Misaligned writes (512-byte steps) over a range then read back aligned, and the reverse.
    dd if="$WORK/dio.pat" of="$DEV" bs=1536 seek=$((50 * 1024 * 1024 / 1536)) oflag=direct status=none
    stop_server
    start_server dio0 "$img"
    cmp <(dd if="$DEV" bs=1536 skip=$((50 * 1024 * 1024 / 1536)) count=$((8 * 1024 * 1024 / 1536)) iflag=direct status=none) \
        <(head -c $((8 * 1024 * 1024 / 1536 * 1536)) "$WORK/dio.pat")
    stop_server
    # On tmpfs the same mode goes through the page cache.
    start_server tmp0 "$WORK/tmpfs.img" --size 16M --cache none --log-level debug
    grep -q 'image on tmpfs' "$SERVER_LOG.err"
    stop_server
    umount "$mnt"
    rm -f "$fs"
}

# The first reads of a fresh device on an O_DIRECT image (a fully written file on ext4) return
# the image's bytes: each one lands in a kernel bounce page, which O_DIRECT cannot pin (the
# mapping is VM_IO), so the engine must fall back to the page cache without failing a read.
test_odirect_first_reads() {
    local fs=$WORK/first.ext4 mnt=$WORK/first
    ext4_on_loop "$fs" "$mnt"
    local img=$mnt/first.img
    dd if=/dev/urandom of="$WORK/first.pat" bs=1M count=64 status=none
    cp "$WORK/first.pat" "$img"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    start_server first0 "$img" --cache none --log-level debug
    grep -q 'bypasses the page cache' "$SERVER_LOG.err"
    # Buffered, then direct with a new device: both through pages never mapped before.
    cmp "$DEV" "$WORK/first.pat"
    stop_server
    start_server first0 "$img"
    cmp <(dd if="$DEV" bs=64k iflag=direct status=none) "$WORK/first.pat"
    stop_server
    expect_fail grep -q 'backend I/O failed' "$WORK"/first0.*.err
    umount "$mnt"
    rm -f "$fs" "$WORK/first.pat"
}

# --own-bounce-pages: our huge-page memory replaces the kernel's bounce pages. The kernel
# pins all of it (VmPin), data written and read with O_DIRECT through it verifies, and each
# server taken over by SIGKILL while fio verifies mixed sizes registers its own pages again,
# with nothing lost and no I/O error in the kernel log. A driver reset then keeps them.
test_own_bounce_pages() {
    local fs=$WORK/own.ext4 mnt=$WORK/own kernel_lines
    kernel_lines=$(dmesg | wc -l)
    truncate -s 400M "$fs"
    mkfs.ext4 -q "$fs"
    mkdir -p "$mnt"
    mount -o loop "$fs" "$mnt"
    local img=$mnt/own.img
    start_server own0 "$img" --size 320M --queues 2 --own-bounce-pages --log-level info
    local dev=$DEV
    # The bounce range appears with the first request, which the partition scan made.
    local i
    for i in $(seq 1 50); do grep -q 'bounce pages are ours' "$SERVER_LOG.err" && break; sleep 0.1; done
    grep 'bounce pages are ours' "$SERVER_LOG.err"
    local bytes pinned_kib
    bytes=$(sed -n 's/.*bounce pages are ours.*bytes=\([0-9]*\).*/\1/p' "$SERVER_LOG.err" | head -n1)
    pinned_kib=$(awk '/^VmPin:/ {print $2}' "/proc/$SERVER_PID/status")
    echo "bounce $bytes bytes, VmPin $pinned_kib kB"
    ((bytes > 0 && pinned_kib * 1024 >= bytes))
    # Own pages get 32 MiB per queue, and the kernel's default 64 MiB at least.
    ((bytes == 64 * 1024 * 1024))
    # Enough to write that the release build's writer outlasts three kills.
    verify_writer "$dev" "$WORK/own.fio" 160M --bsrange=4k-256k --io_size=150M --verify_backlog=256
    local kills=0
    while ((kills < 3)); do
        sleep 0.7
        kill -0 "$FIO_PID" || break
        kill_and_take_over own0 "$img" --own-bounce-pages --log-level info
        kills=$((kills + 1))
        # A device taken over already has its bounce range: the pages are registered at once.
        for i in $(seq 1 50); do grep -q 'bounce pages are ours' "$SERVER_LOG.err" && break; sleep 0.1; done
        grep -q 'bounce pages are ours' "$SERVER_LOG.err"
    done
    writer_verified "$WORK/own.fio" "$kills" 3
    # What the device returns through our pages is what the image holds.
    cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$img"
    # A driver reset (virtio_vdpa unbound and bound again) keeps our pages registered: the
    # kernel drops its bounce range and makes it again, on our pages, at the next request.
    echo own0 >/sys/bus/vdpa/drivers/virtio_vdpa/unbind
    echo own0 >/sys/bus/vdpa/drivers/virtio_vdpa/bind
    local blk=''
    for i in $(seq 1 100); do
        blk=$(ls /sys/bus/vdpa/devices/own0/virtio*/block 2>/dev/null | head -n1)
        [[ -n $blk && -b /dev/$blk ]] && break
        sleep 0.1
    done
    dev=/dev/$blk
    # The server saw the reset: its datapath started again after the takeover's.
    grep 'datapath st' "$SERVER_LOG.err"
    [[ $(grep -c 'datapath started' "$SERVER_LOG.err") -ge 2 ]]
    fio --name=reset --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-256k \
        --iodepth=32 --size=32M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
        --verify_state_save=0 --output="$WORK/reset.fio"
    expect_fail grep -qi 'verify.*bad\|err= *[1-9]' "$WORK/reset.fio"
    # More 1 MiB requests in flight than the 64 MiB region holds: those that find no room
    # wait (BLK_STS_RESOURCE, sent again), none fails.
    fio --name=full --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=1M \
        --iodepth=128 --size=160M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --randrepeat=0 --verify_state_save=0 --output="$WORK/full.fio"
    expect_fail grep -qi 'verify.*bad\|err= *[1-9]' "$WORK/full.fio"
    cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$img"
    expect_fail grep -q 'backend I/O failed\|cannot register ours' "$WORK"/own0.*.err
    local errors
    errors=$(kernel_errors_since "$kernel_lines")
    echo "kernel errors: ${errors:-none}"
    [[ -z $errors ]]
    stop_server
    gone own0
    umount "$mnt"
    rm -f "$fs"
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
    expect_fail grep -q '^stale0 ' "$WORK/list"
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
    local t0=$SECONDS
    expect_fail "$BIN" device serve --image "$WORK/busy.img" --name busy0 2>"$WORK/err"
    cat "$WORK/err"
    # Refused at once by the device (its node is busy), not after the image lock's minute.
    grep -q 'served by another process' "$WORK/err"
    ((SECONDS - t0 < 10))
    dd if="$DEV" of=/dev/null bs=1M count=1 iflag=direct status=none
    stop_server
    gone busy0
}

# metric NAME LABELS FILE: the value of the sample NAME{LABELS} in a scrape (0 if absent).
metric() {
    awk -v want="$1{$2}" '$1 == want { print $2; found = 1 } END { if (!found) print 0 }' "$3"
}

# within PCT A B: A is within PCT percent of B.
within() {
    awk -v p="$1" -v a="$2" -v b="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b > 0 && d * 100 <= p * b) }'
}

# The metrics endpoint after a fio run: requests and bytes by operation match what fio did
# (within 1 %), and the other families are there.
test_metrics_match_fio() {
    local img=$WORK/metrics.img addr=127.0.0.1:9811
    start_server m0 "$img" --size 256M --queues 2 --metrics-address $addr
    curl -sf "http://$addr/metrics" >"$WORK/before"
    fio --name=w --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
        --size=64M --io_size=24M --randrepeat=0 --output-format=json >"$WORK/w.json"
    # Random, so the block layer merges (almost) nothing: one fio I/O is one request.
    fio --name=r --filename="$DEV" --ioengine=libaio --direct=1 --rw=randread --bs=16k --iodepth=4 \
        --size=64M --io_size=16M --randrepeat=0 --output-format=json >"$WORK/r.json"
    curl -sf "http://$addr/metrics" >"$WORK/after"
    grep -E '^vduse_csi_(requests|bytes)_total\{volume_id="m0",queue="[01]",op="(read|write)"\}' "$WORK/after"
    local op job field fio_n got before
    for op in read write; do
        job=$WORK/w.json
        [[ $op == read ]] && job=$WORK/r.json
        for field in total_ios io_bytes; do
            fio_n=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['jobs'][0][sys.argv[2]][sys.argv[3]])" \
                "$job" $op $field)
            got=0
            for q in 0 1; do
                local name=vduse_csi_requests_total
                [[ $field == io_bytes ]] && name=vduse_csi_bytes_total
                before=$(metric $name "volume_id=\"m0\",queue=\"$q\",op=\"$op\"" "$WORK/before")
                got=$((got + $(metric $name "volume_id=\"m0\",queue=\"$q\",op=\"$op\"" "$WORK/after") - before))
            done
            echo "$op $field: fio $fio_n, metrics $got"
            within 1 "$got" "$fio_n"
        done
    done
    for family in requests_in_flight kicks_total interrupts_total request_duration_seconds_count \
        device_takeovers_total queue_faults_total qos_throttled_seconds_total requests_failed_total; do
        grep -q "^vduse_csi_$family{" "$WORK/after" || { echo "no $family"; return 1; }
    done
    # Every request is counted once in a latency bucket.
    local reads_hist
    reads_hist=$(metric vduse_csi_request_duration_seconds_count 'volume_id="m0",op="read"' "$WORK/after")
    echo "read latency samples: $reads_hist"
    [[ $reads_hist -gt 0 ]]
    stop_server
}

# QoS: a device limited to 500 read IOPS measures 450-550 under fio 4k random read at QD32
# while an unlimited device beside it runs free; a write-bytes limit holds for 1 MiB writes.
test_qos_limits_hold() {
    start_server slow "$WORK/slow.img" --size 256M --max-read-iops 500
    local slow=$DEV slow_pid=$SERVER_PID
    start_server fast "$WORK/fast.img" --size 256M
    local fast=$DEV
    # ramp_time spends the one-second burst a full bucket allows before measuring.
    local common=(--ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth=32 --time_based
        --ramp_time=2 --runtime=10 --output-format=json)
    fio --name=slow --filename="$slow" "${common[@]}" >"$WORK/slow.json" &
    local fio_slow=$!
    fio --name=fast --filename="$fast" "${common[@]}" >"$WORK/fast.json"
    wait $fio_slow
    local slow_iops fast_iops
    slow_iops=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['jobs'][0]['read']['iops']))" "$WORK/slow.json")
    fast_iops=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['jobs'][0]['read']['iops']))" "$WORK/fast.json")
    echo "limited to 500 read IOPS: $slow_iops IOPS; unlimited beside it: $fast_iops IOPS"
    ((slow_iops >= 450 && slow_iops <= 550))
    ((fast_iops > 2 * slow_iops))
    kill -TERM $slow_pid
    wait $slow_pid
    stop_server

    start_server wlim "$WORK/wlim.img" --size 256M --max-write-bytes-per-sec 8M
    fio --name=wbytes --filename="$DEV" --ioengine=libaio --direct=1 --rw=write --bs=1M --iodepth=4 \
        --time_based --ramp_time=2 --runtime=10 --output-format=json >"$WORK/wbytes.json"
    local bw
    bw=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['jobs'][0]['write']['bw_bytes'])" "$WORK/wbytes.json")
    echo "limited to 8 MiB/s of writes: $((bw / 1024)) KiB/s"
    within 10 "$bw" $((8 << 20))
    stop_server
}

# --- runner --------------------------------------------------------------------

run() {
    local name=$1 start=$SECONDS rc=0
    echo "=== $name"
    # Not `( ... ) || rc=$?`: bash ignores `set -e` in a subshell that is the left side of
    # `||`, and a test would then pass whenever its last command did.
    (
        set -euxo pipefail
        "test_$name"
    ) >"$OUT/$name.log" 2>&1
    rc=$?
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
