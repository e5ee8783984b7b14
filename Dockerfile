# vduse-csi plugin image: the release binary on a slim Debian with exactly the
# tools the plugin runs (mkfs/fsck/resize for ext4 and xfs, blkid, modprobe) and
# the Ceph client libraries of the RBD backend (librbd1, which brings librados2).
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
#
#   docker build -t vduse-csi:0.1.0 .

FROM rust:1.95-bookworm AS builder
# build.rs generates the librados/librbd binding with bindgen (libclang) from
# Debian's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        libclang-dev \
        librbd-dev \
        librados-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the registry and target/ between builds; the
# binary is copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/vduse-csi /out/vduse-csi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        e2fsprogs \
        xfsprogs \
        util-linux \
        kmod \
        librbd1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/vduse-csi /usr/local/bin/vduse-csi
LABEL org.opencontainers.image.title="vduse-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver serving volumes as VDUSE virtio-blk devices" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/vduse-csi"]
