# vduse-csi plugin image: the release binary on a slim Debian with exactly the
# tools the plugin runs (mkfs/fsck/resize for ext4 and xfs, blkid, modprobe) and
# the Ceph client libraries of the RBD backend (librbd1, which brings librados2).
#
#   docker build -t vduse-csi:0.1.0 .
#
# By default the binary is built here, in a Rust stage (BuildKit, the default
# builder since Docker 23, or buildah/podman). Where no Rust toolchain image
# can be had (no registry), build the binary on a Debian 12 machine and pass a
# context that holds just it:
#
#   cargo build --release && mkdir -p dist && cp target/release/vduse-csi dist/
#   buildah bud --build-arg BINARY=prebuilt -f Dockerfile -t vduse-csi:0.1.0 dist/
#
# (the test suite does this: tests/e2e/install-images.sh).
ARG BINARY=source

FROM rust:1.95-bookworm AS binary-source
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
# Cache mounts keep the registry and target/ between builds; the binary is
# copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/vduse-csi /out/vduse-csi

# A binary built outside, the only file of the build context. It must be built
# on Debian 12 (bookworm): it links the glibc and librbd1 of the image below.
FROM scratch AS binary-prebuilt
COPY vduse-csi /out/vduse-csi

FROM binary-${BINARY} AS binary

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        e2fsprogs \
        xfsprogs \
        util-linux \
        kmod \
        librbd1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# (apt-get clean: a base image without Debian's docker-clean hook, such as one made with
# mmdebstrap, would otherwise keep every downloaded package and apt's caches, 105 MB.)
COPY --from=binary /out/vduse-csi /usr/local/bin/vduse-csi
LABEL org.opencontainers.image.title="vduse-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver serving volumes as VDUSE virtio-blk devices" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/vduse-csi"]
