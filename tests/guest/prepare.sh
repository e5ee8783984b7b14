#!/usr/bin/env bash
# Prepare the VDUSE test guest: a Debian 6.12 kernel and a busybox initramfs.
#
# Usage: tests/guest/prepare.sh            (normally called by tests/guest/run.sh)
#
# Results, in ${GUEST_DIR:-<repo>/target/guest}:
#   vmlinuz      the guest kernel
#   initrd.img   newc cpio + gzip: busybox as /init (tests/guest/init) and the
#                decompressed modules listed in /etc/modules.load, in load order
#
# Idempotent: the kernel package is fetched and unpacked once; the initramfs is
# rebuilt only when its inputs change (this script, init, busybox, the kernel or
# the module list), tracked by a hash in initrd.stamp. To pick up a newer kernel
# package, delete ${GUEST_DIR}/kernel (or the whole directory).
#
# Environment:
#   GUEST_DIR         cache directory (default <repo>/target/guest)
#   GUEST_KERNEL_DEB  use this kernel .deb instead of finding/downloading one
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
GUEST_DIR=${GUEST_DIR:-$repo/target/guest}

# What the guest needs. modprobe --show-depends adds the dependencies
# (vdpa, vhost_iotlb, netfs, 9pnet, jbd2, crc32c, ...). vhost_vdpa is
# deliberately absent: on the vdpa bus the first loaded driver wins the bind,
# and it must be virtio_vdpa so that devices become /dev/vdX (VDUSE.md §2).
# ublk_drv: the benchmark's rublk peer; rbd and nbd: its krbd and rbd-nbd peers; overlay:
# containerd's snapshotter in the kubelet e2e (each container's root without a copy).
MODULES=(9p 9pnet_virtio vduse virtio_vdpa virtio_blk ext4 xfs loop ublk_drv rbd nbd overlay)
# Package name pattern for apt-cache (regex) and for files in the cache (glob).
KPKG_RE='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
KPKG_GLOB='linux-image-6.12.*+deb12-amd64-unsigned_*.deb'

log() { echo "guest/prepare: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in dpkg depmod modprobe cpio gzip xz sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
busybox=$(command -v busybox || true)
[[ -n $busybox ]] || die "busybox not found (install busybox-static)"
# The initramfs has no libc, so busybox must be the static build.
if LC_ALL=C ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked (install busybox-static)"
fi

mkdir -p "$GUEST_DIR"
# Serialise concurrent callers (two run.sh at once); the lock is released on exit.
exec 9>"$GUEST_DIR/.prepare.lock"
flock 9

# --- 1. kernel package -------------------------------------------------------

# Prints the path of the kernel .deb to unpack, downloading it if needed.
pick_deb() {
    if [[ -n ${GUEST_KERNEL_DEB:-} ]]; then
        [[ -f $GUEST_KERNEL_DEB ]] || die "GUEST_KERNEL_DEB=$GUEST_KERNEL_DEB: no such file"
        echo "$GUEST_KERNEL_DEB"
        return
    fi
    local newest
    newest=$(apt-cache search --names-only "$KPKG_RE" 2>/dev/null |
        awk '{print $1}' | sort -V | tail -n 1 || true)
    if [[ -n $newest ]] && ! compgen -G "$GUEST_DIR/${newest}_*.deb" >/dev/null; then
        log "downloading $newest"
        local aptopts=()
        # As root, apt would try to drop to user _apt, which cannot write here.
        [[ $EUID -eq 0 ]] && aptopts=(-o APT::Sandbox::User=root)
        (cd "$GUEST_DIR" && apt-get download -q "${aptopts[@]}" "$newest" >&2) ||
            log "warning: apt-get download $newest failed; trying a .deb already in $GUEST_DIR"
    fi
    # Fall back to whatever matching package is already in the cache directory.
    local debs=()
    if [[ -n $newest ]]; then
        mapfile -t debs < <(compgen -G "$GUEST_DIR/${newest}_*.deb" || true)
    fi
    if [[ ${#debs[@]} -eq 0 ]]; then
        mapfile -t debs < <(compgen -G "$GUEST_DIR/$KPKG_GLOB" | sort -V || true)
    fi
    [[ ${#debs[@]} -gt 0 ]] ||
        die "no kernel package: apt-get download failed and no $KPKG_GLOB in $GUEST_DIR"
    echo "${debs[-1]}"
}

kroot=$GUEST_DIR/kernel
if [[ ! -f $kroot/.unpacked ]]; then
    deb=$(pick_deb)
    log "unpacking $(basename "$deb")"
    rm -rf "$kroot" "$kroot.tmp"
    mkdir -p "$kroot.tmp"
    dpkg -x "$deb" "$kroot.tmp"
    kvers=("$kroot.tmp"/lib/modules/*)
    [[ ${#kvers[@]} -eq 1 && -d ${kvers[0]} ]] || die "expected one lib/modules/<version> in $deb"
    # The package ships no modules.dep (its postinst runs depmod); build it so
    # that modprobe --show-depends can resolve dependencies. Takes ~10 s.
    log "running depmod"
    depmod -b "$kroot.tmp" "$(basename "${kvers[0]}")"
    basename "$deb" >"$kroot.tmp/.unpacked"
    mv "$kroot.tmp" "$kroot"
fi

kvers=("$kroot"/lib/modules/*)
kver=$(basename "${kvers[0]}")
vmlinuz=$kroot/boot/vmlinuz-$kver
[[ -f $vmlinuz ]] || die "no $vmlinuz in the kernel package"
ln -sfn "kernel/boot/vmlinuz-$kver" "$GUEST_DIR/vmlinuz"

# --- 2. module list ------------------------------------------------------------

# modprobe prints "insmod /abs/path.ko.xz [options]" per module in load order,
# or "builtin NAME". Shared dependencies repeat across modules: keep the first.
declare -A seen=()
kos=()
for mod in "${MODULES[@]}"; do
    deps=$(modprobe -d "$kroot" -S "$kver" --show-depends "$mod") ||
        die "modprobe --show-depends $mod failed"
    while read -r verb path _; do
        [[ $verb == insmod ]] || continue
        rel=${path#"$kroot/lib/modules/$kver/"}
        [[ -n ${seen[$rel]:-} ]] && continue
        seen[$rel]=1
        kos+=("$rel")
    done <<<"$deps"
done

# --- 3. initramfs ----------------------------------------------------------------

initrd=$GUEST_DIR/initrd.img
stamp_file=$GUEST_DIR/initrd.stamp
stamp=$(
    {
        sha256sum "$here/prepare.sh" "$here/init" "$busybox" | awk '{print $1}'
        cat "$kroot/.unpacked"
        printf '%s\n' "$kver" "${kos[@]}"
    } | sha256sum | awk '{print $1}'
)
if [[ -f $initrd && -f $stamp_file && $(<"$stamp_file") == "$stamp" ]]; then
    exit 0
fi

# Drops the signature appended to a module: [module][signature][struct
# module_signature (12 bytes, big-endian sig_len last)]["~Module signature
# appended~\n" (28 bytes)]. The kernel then skips the check (it only taints
# itself: CONFIG_MODULE_SIG_FORCE is off), which saves seconds under TCG.
strip_signature() {
    local f=$1 size siglen
    [[ $(tail -c 28 "$f") == "~Module signature appended~" ]] || return 0
    size=$(stat -c %s "$f")
    siglen=$(tail -c 32 "$f" | head -c 4 | od -An -tu1 |
        awk '{print $1 * 16777216 + $2 * 65536 + $3 * 256 + $4}')
    truncate -s $((size - 28 - 12 - siglen)) "$f"
}

log "building initramfs for $kver (${#kos[@]} modules)"
staging=$(mktemp -d "$GUEST_DIR/initrd.staging.XXXXXX")
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging"/{bin,dev,proc,sys,host,out,etc,tmp}
cp "$busybox" "$staging/bin/busybox"
# The applet links are made at boot (busybox --install); /bin/sh is needed first.
ln -s busybox "$staging/bin/sh"
cp "$here/init" "$staging/init"
chmod 0755 "$staging/init"
: >"$staging/etc/modules.load"
for rel in "${kos[@]}"; do
    src=$kroot/lib/modules/$kver/$rel
    dst=$staging/lib/modules/$kver/${rel%.ko*}.ko
    mkdir -p "$(dirname "$dst")"
    # Decompressed, so busybox insmod needs no xz support and boot does less work.
    case $rel in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -q -dc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *.ko) cp "$src" "$dst" ;;
    *) die "unexpected module file $rel" ;;
    esac
    strip_signature "$dst"
    echo "${dst#"$staging"}" >>"$staging/etc/modules.load"
done
echo "$kver" >"$staging/etc/kernel-release"

# Sorted, root-owned entries: the archive depends only on its inputs.
(cd "$staging" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) |
    gzip -6 >"$initrd.tmp"
mv "$initrd.tmp" "$initrd"
echo "$stamp" >"$stamp_file"
log "wrote $initrd ($(du -h "$initrd" | cut -f1)); modules: $(printf '%s ' "${kos[@]##*/}")"
