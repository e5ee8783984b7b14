#!/usr/bin/env bash
# Harness smoke test, run inside the guest:  tests/guest/run.sh tests/guest/smoke-qsd.sh
#
# Proves the guest end to end with QEMU's own VDUSE server: qemu-storage-daemon
# exports a sparse image as VDUSE virtio-blk, `vdpa dev add` attaches it through
# virtio_vdpa, and the resulting /dev/vdX takes an ext4 filesystem, a file, an
# fsck and a detach. Exits 0 only if every step worked.
set -euo pipefail

name=qsd0
work=/tmp/smoke-qsd
img=$work/disk.img
mnt=$work/mnt
qsd_pid=
attached=

step() { echo "smoke: [$(cut -d" " -f1 /proc/uptime)] $*"; }
fail() {
    echo "smoke: FAILED: $*" >&2
    exit 1
}
cleanup() {
    local rc=$?
    set +e
    mountpoint -q "$mnt" && umount "$mnt"
    [[ -n $attached ]] && vdpa dev del "$name"
    if [[ -n $qsd_pid ]]; then
        kill "$qsd_pid" 2>/dev/null
        wait "$qsd_pid" 2>/dev/null
    fi
    exit "$rc"
}
trap cleanup EXIT

# Waits up to $1 seconds (in 0.1 s steps) for the command after it to succeed.
wait_for() {
    local tries=$(($1 * 10))
    shift
    until "$@"; do
        ((--tries > 0)) || return 1
        sleep 0.1
    done
}

step "kernel $(uname -r); loaded: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
[[ -c /dev/vduse/control ]] || fail "no /dev/vduse/control"
step "$(ls -l /dev/vduse/control)"
[[ -d /sys/bus/vdpa ]] || fail "no /sys/bus/vdpa"
step "vdpa drivers: $(ls /sys/bus/vdpa/drivers | tr '\n' ' ')"
step "vdpa mgmtdevs: $(vdpa mgmtdev show | tr '\n' ' ')"

mkdir -p "$mnt"
truncate -s 256M "$img"

step "starting qemu-storage-daemon"
qemu-storage-daemon \
    --blockdev "file,filename=$img,node-name=d0" \
    --export "vduse-blk,id=e0,node-name=d0,name=$name,num-queues=1,writable=on,queue-size=256" &
qsd_pid=$!
wait_for 30 test -c "/dev/vduse/$name" || fail "qsd did not create /dev/vduse/$name"

step "vdpa dev add name $name mgmtdev vduse"
vdpa dev add name "$name" mgmtdev vduse
attached=1
disk_glob() { compgen -G "/sys/bus/vdpa/devices/$name/virtio*/block/*" >/dev/null; }
wait_for 30 disk_glob || fail "no block device under /sys/bus/vdpa/devices/$name"
sysblk=$(compgen -G "/sys/bus/vdpa/devices/$name/virtio*/block/*" | head -n 1)
dev=/dev/$(basename "$sysblk")
step "driver: $(basename "$(readlink "/sys/bus/vdpa/devices/$name/driver")"), disk: $dev" \
    "($(cat "$sysblk/dev"), $(($(cat "$sysblk/size") * 512 / 1048576)) MiB)"
wait_for 10 test -b "$dev" || fail "$dev did not appear"

step "mkfs.ext4 $dev"
mkfs.ext4 -q -F "$dev"
mount "$dev" "$mnt"
echo "hello from the vduse guest" >"$mnt/hello.txt"
dd if=/dev/urandom of="$mnt/random.bin" bs=1M count=8 status=none
sum=$(sha256sum <"$mnt/random.bin")
umount "$mnt"
step "fsck + remount check"
e2fsck -fn "$dev" >/dev/null || fail "e2fsck found problems"
# Drop the page cache so the re-read really goes through the device.
echo 3 >/proc/sys/vm/drop_caches
mount -o ro "$dev" "$mnt"
[[ $(cat "$mnt/hello.txt") == "hello from the vduse guest" ]] || fail "hello.txt differs"
[[ $(sha256sum <"$mnt/random.bin") == "$sum" ]] || fail "random.bin differs"
umount "$mnt"

step "vdpa dev del $name"
vdpa dev del "$name"
attached=
[[ ! -e /sys/bus/vdpa/devices/$name ]] || fail "vdpa device still present"
kill "$qsd_pid"
wait "$qsd_pid" || true # killed by SIGTERM: non-zero status expected
qsd_pid=
step "image allocation: $(du -h "$img" | cut -f1) of 256M"
step "OK"
