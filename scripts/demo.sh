#!/usr/bin/env bash
# The main job, end to end: serve a sparse image as a host block device with
# `vduse-csi device serve`, put ext4 on it, write and read back a file, stop, serve
# again and check the file survived. On a host without VDUSE it runs itself inside
# the test guest (tests/guest/run.sh), which needs QEMU (see .ci/run for packages).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -z ${GUEST_OUT_DIR:-} ]]; then
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
    export VDUSE_CSI_BIN=$repo/target/release/vduse-csi
    if [[ ! -e /dev/vduse/control ]]; then
        echo "demo: this host has no /dev/vduse/control; running the demo in the VDUSE test guest"
        export GUEST_ENV=VDUSE_CSI_BIN GUEST_QUIET=1
        status=0
        "$repo/tests/guest/run.sh" "$repo/scripts/demo.sh" "$repo/target/guest/demo" >&2 || status=$?
        cat "$repo/target/guest/demo/output.log"
        exit "$status"
    fi
fi

BIN=${VDUSE_CSI_BIN:-$repo/target/release/vduse-csi}
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
work=$(mktemp -d /tmp/vduse-demo.XXXXXX)
trap 'umount -q "$work/mnt" 2>/dev/null || true; kill -TERM "${pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/mnt"

serve() {
    "$BIN" device serve --image "$work/disk.img" --size 1G --name demo0 >"$work/out" &
    pid=$!
    for _ in $(seq 1 600); do [[ -s $work/out ]] && break; sleep 0.1; done
    dev=$(head -n1 "$work/out")
    echo "demo: serving $work/disk.img as $dev (pid $pid)"
}

serve
mkfs.ext4 -q "$dev"
mount "$dev" "$work/mnt"
head -c 64M /dev/urandom >"$work/mnt/data"
sum=$(sha256sum <"$work/mnt/data")
umount "$work/mnt"
kill -TERM "$pid" && wait "$pid"
echo "demo: stopped; image allocates $(du -h "$work/disk.img" | cut -f1) of 1G"
: >"$work/out"
serve
mount "$dev" "$work/mnt"
[[ $(sha256sum <"$work/mnt/data") == "$sum" ]] && echo "demo: data intact after restart ($sum)"
umount "$work/mnt"
kill -TERM "$pid" && wait "$pid"
pid=
echo "demo: done"
