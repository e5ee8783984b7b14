#!/usr/bin/env bash
# Prepares, once, what the kubelet end-to-end test (tests/e2e/run.sh) needs, in a cache
# outside the clone so that a second run rebuilds nothing:
#   $CACHE/bin/{kubelet,kube-apiserver,kube-controller-manager,kubectl}
#       Kubernetes 1.20.2 built from Debian 12's `kubernetes` source package with Debian's Go
#       (no registry or download ships these binaries);
#   $CACHE/images/{pause,e2e}.tar
#       a pause image (the tree's pause.c, built static) and a busybox test image, as
#       docker-archive tarballs for `ctr images import`;
#   $CACHE/sidecars/bin/* and $CACHE/images/<sidecar>.tar
#       the CSI sidecars that deploy/ runs, built from the upstream sources (with their vendor/
#       folders) in $VDUSE_CSI_SIDECARS (the tarballs' folder; by default `sidecars` in the
#       folder `shared` beside the checkout), each a one-binary image;
#   $CACHE/crds/*.yaml and $CACHE/snapshot-controller.yaml
#       the VolumeSnapshot CRDs and the snapshot-controller's RBAC from the same sources;
#   buildah's local image debian:bookworm-slim
#       the base image of our Dockerfile, made by mmdebstrap from Debian's packages (no
#       registry can be reached);
# and installs the Debian packages the guest uses: etcd-server, containerd, runc.
# Each step prints its time ("e2e/prepare: step NAME: N s").
#
# Env: VDUSE_CSI_E2E_CACHE (default /var/cache/vduse-csi-e2e), VDUSE_CSI_SIDECARS.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VDUSE_CSI_E2E_CACHE:-/var/cache/vduse-csi-e2e}
SIDECARS=${VDUSE_CSI_SIDECARS:-$here/../../../shared/sidecars}
BINS=(kubelet kube-apiserver kube-controller-manager kube-scheduler kubectl)
log() { echo "e2e/prepare: $*" >&2; }
step_start=$SECONDS
step() { # NAME: the time of the step that just ended
    log "step $1: $((SECONDS - step_start)) s"
    step_start=$SECONDS
}

export DEBIAN_FRONTEND=noninteractive
# buildah builds the plugin's image from our Dockerfile; mmdebstrap makes its base image.
packages=(golang-go golang-github-modern-go-reflect2-dev etcd-server containerd runc dpkg-dev rsync
    gcc libc6-dev busybox-static openssl python3 containernetworking-plugins bc buildah mmdebstrap)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# containerd's service must not run on the host: the guest starts its own.
systemctl disable --now containerd >/dev/null 2>&1 || true
# The guest's root is this host's, read-only. deploy/'s node plugin mounts the host's
# /lib/modules (its init container loads the VDUSE modules from there), and a node always has
# one; a machine without kernel modules (a VM with a monolithic kernel) gets the empty folder.
mkdir -p /lib/modules

step packages

mkdir -p "$CACHE/bin" "$CACHE/images"
missing=()
for b in "${BINS[@]}"; do [[ -x $CACHE/bin/$b ]] || missing+=("$b"); done
if ((${#missing[@]})); then
    src=$CACHE/src
    mkdir -p "$src"
    if ! compgen -G "$src/kubernetes_*.dsc" >/dev/null; then
        # Source packages need deb-src lines; a separate file leaves the system's alone.
        cat >/etc/apt/sources.list.d/vduse-csi-e2e-src.sources <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        apt-get update -qq
        (cd "$src" && apt-get source --download-only kubernetes >/dev/null 2>&1)
    fi
    tree=$src/k8s
    rm -rf "$tree"
    (cd "$src" && dpkg-source -x --no-check kubernetes_*.dsc k8s >/dev/null)
    # The vendored reflect2 1.0.1 breaks on Go >= 1.18; Debian packages 1.0.2.
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
    rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod"
    # kubelet before 1.26 sends a unix socket's path as the HTTP/2 :authority, which the h2
    # crate under tonic rejects (PROTOCOL_ERROR), so it could neither register nor call our
    # plugin. Kubernetes fixed it in 1.26 (kubernetes/kubernetes#112597: "localhost" as the
    # authority of unix-socket calls); the same two-line fix is applied here.
    sed -i 's/^\t\tgrpc.WithInsecure(),$/\t\tgrpc.WithInsecure(),\n\t\tgrpc.WithAuthority("localhost"),/' \
        "$tree/pkg/volume/csi/csi_client.go"
    sed -i 's/grpc.DialContext(ctx, unixSocketPath, grpc.WithInsecure(),/&  grpc.WithAuthority("localhost"),/' \
        "$tree/pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go"
    if ! grep -q 'WithAuthority("localhost")' "$tree/pkg/volume/csi/csi_client.go" ||
        ! grep -q 'WithAuthority("localhost")' "$tree/pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go"; then
        log "cannot apply the :authority fix to kubelet"
        exit 1
    fi
    # Debian's own way (debian/rules): GOPATH mode through the tree's Makefile, which also
    # generates the OpenAPI and other files the tarball lacks.
    mkdir -p "$tree/.go/src/k8s.io"
    ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
    log "building ${missing[*]} from Debian's kubernetes source (about 10 minutes on 2 cores)"
    start=$SECONDS
    # A clean environment: under `cargo test` this script inherits cargo's variables, and
    # Kubernetes' Makefile takes OUT_DIR (cargo's build-script folder) as its own output.
    (cd "$tree" && env -i PATH="$PATH" LANG=C.UTF-8 GOPATH="$tree/.go" CGO_ENABLED=0 HOME="$src/home" \
        make WHAT="$(printf 'cmd/%s ' "${missing[@]}")" >"$src/build.log" 2>&1) ||
        { tail -20 "$src/build.log" >&2; log "build failed; log: $src/build.log"; exit 1; }
    for b in "${missing[@]}"; do cp "$tree/_output/bin/$b" "$CACHE/bin/$b"; done
    log "built in $((SECONDS - start)) s"
    cp "$tree/build/pause/linux/pause.c" "$CACHE/pause.c"
    rm -rf "$tree" "${src:?}/home"
fi

if [[ ! -s $CACHE/images/pause.tar ]]; then
    [[ -f $CACHE/pause.c ]] || { log "no pause.c in $CACHE; remove $CACHE/bin to rebuild"; exit 1; }
    gcc -Os -static -DVERSION=e2e -o "$CACHE/pause" "$CACHE/pause.c"
    "$here/make-image.py" "$CACHE/images/pause.tar" registry.local/pause:e2e '["/pause"]' "$CACHE/pause=/pause"
fi
if [[ ! -s $CACHE/images/e2e.tar ]]; then
    links=()
    for applet in sh ls cat echo sleep dd md5sum sync df mount stat touch rm mkdir head tail grep seq test true; do
        links+=("/bin/$applet->busybox")
    done
    "$here/make-image.py" "$CACHE/images/e2e.tar" registry.local/e2e:busybox '["/bin/sh"]' \
        "$(command -v busybox)=/bin/busybox" "${links[@]}"
fi
step kubernetes

# --- the CSI sidecars: static Go binaries from upstream's sources and vendor/ folders ---------
# tarball name, then each command it builds (tests/e2e/install.sh names the images alike).
SIDECAR_BUILDS=(
    "external-provisioner-v3.4.1 csi-provisioner"
    "node-driver-registrar-v2.7.0 csi-node-driver-registrar"
    "external-resizer-v1.7.0 csi-resizer"
    "external-snapshotter-v6.2.3 csi-snapshotter snapshot-controller"
    "livenessprobe-v2.9.0 livenessprobe"
)
mkdir -p "$CACHE/sidecars/bin" "$CACHE/crds"
for entry in "${SIDECAR_BUILDS[@]}"; do
    read -r release commands <<<"$entry"
    version=${release##*-}
    for command in $commands; do
        [[ -s $CACHE/images/$command.tar ]] && continue
        if [[ ! -x $CACHE/sidecars/bin/$command ]]; then
            tarball=$SIDECARS/$release.tar.xz
            [[ -f $tarball ]] || { log "no $tarball (set VDUSE_CSI_SIDECARS)"; exit 1; }
            work=$CACHE/sidecars/src
            rm -rf "$work" && mkdir -p "$work"
            xz -dc "$tarball" | tar -x -C "$work"
            log "building $command $version"
            # A clean environment, as for Kubernetes above; the Go build cache stays in the cache.
            (cd "$work/$release" && env -i PATH="$PATH" HOME="$CACHE/sidecars/home" \
                GOCACHE="$CACHE/sidecars/go-build" GOFLAGS=-mod=vendor GOTOOLCHAIN=local GOPROXY=off \
                CGO_ENABLED=0 go build -ldflags "-X main.version=$version" \
                -o "$CACHE/sidecars/bin/$command" "./cmd/$command" >"$CACHE/sidecars/$command.log" 2>&1) ||
                { cat "$CACHE/sidecars/$command.log" >&2; log "cannot build $command"; exit 1; }
            if [[ $release == external-snapshotter-* ]]; then
                cp "$work/$release"/client/config/crd/snapshot.storage.k8s.io_*.yaml "$CACHE/crds/"
                cp "$work/$release/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml" \
                    "$CACHE/snapshot-controller-rbac.yaml"
            fi
            rm -rf "$work"
        fi
        "$here/make-image.py" "$CACHE/images/$command.tar" "registry.local/$command:$version" \
            "[\"/$command\"]" "$CACHE/sidecars/bin/$command=/$command"
    done
done
rm -rf "$CACHE/sidecars/go-build"
step sidecars

# --- the base image of our Dockerfile, from Debian's packages ----------------------------------
# What `debian:bookworm-slim` is: a minbase Debian without docs, man pages and locales. Kept in
# buildah's own store (/var/lib/containers), outside the clone, under the name the Dockerfile's
# FROM resolves to.
BASE=docker.io/library/debian:bookworm-slim
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    rootfs=$CACHE/bookworm-slim.tar
    log "making $BASE with mmdebstrap"
    env -i PATH="$PATH" mmdebstrap --quiet --variant=minbase \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$rootfs" http://deb.debian.org/debian >"$CACHE/mmdebstrap.log" 2>&1 ||
        { tail -20 "$CACHE/mmdebstrap.log" >&2; log "mmdebstrap failed"; exit 1; }
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$rootfs" / >/dev/null
    buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "$container"
    buildah commit --quiet --rm "$container" "$BASE" >/dev/null
    rm -f "$rootfs"
fi
step base-image
log "ready in $CACHE"
