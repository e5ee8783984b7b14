#!/usr/bin/env bash
# Builds the plugin's image the way users build it, from the repository's Dockerfile, with
# buildah (a Docker-compatible builder Debian ships) on the base image that
# tests/e2e/prepare.sh made with mmdebstrap, and writes it as a docker-archive tarball for
# `ctr images import` in the guest. No Rust toolchain image can be had here, so the Dockerfile
# takes the binary that cargo built (--build-arg BINARY=prebuilt, a context of that one file).
#
# Usage: tests/e2e/install-images.sh BINARY OUT.tar
# Prints the image's size and contents (the binary and the tools the plugin runs).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
binary=${1:?usage: $0 BINARY OUT.tar}
out=${2:?usage: $0 BINARY OUT.tar}
IMAGE=vduse-csi:0.1.0
log() { echo "e2e/image: $*" >&2; }

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# The test binary is a debug build: stripped, it is a sixth of the size.
strip -o "$context/vduse-csi" "$binary"
start=$SECONDS
# --network=host: the RUN step's apt-get reaches Debian's mirror without a container network.
# --pull=never: every FROM is local (the base from prepare.sh; no registry can be reached).
# A clean environment, like every outside build here (nothing of cargo's reaches buildah).
env -i PATH="$PATH" HOME="${HOME:-/root}" buildah bud --quiet --layers --network=host --pull=never --build-arg BINARY=prebuilt \
    -f "$repo/Dockerfile" -t "$IMAGE" "$context" >/dev/null
rm -f "$out"
buildah push --quiet "$IMAGE" "docker-archive:$out:$IMAGE" >/dev/null
log "built $IMAGE in $((SECONDS - start)) s: $(du -m "$out" | cut -f1) MiB as an archive"
# What it holds: the plugin and every tool it runs, each asked for its version.
container=$(buildah from --pull=never "$IMAGE")
trap 'buildah rm "$container" >/dev/null 2>&1; rm -rf "$context"' EXIT
# shellcheck disable=SC2016 # expanded by the image's shell
buildah run "$container" -- sh -c '
    set -e
    /usr/local/bin/vduse-csi --version
    for t in mkfs.ext4 e2fsck resize2fs mkfs.xfs xfs_repair xfs_growfs blkid modprobe; do
        printf "%s: %s\n" "$t" "$(command -v "$t")"
    done
    dpkg-query -W -f="\${Package} \${Version}\n" librbd1 librados2 e2fsprogs xfsprogs util-linux kmod
' | sed 's/^/e2e\/image: /' >&2
