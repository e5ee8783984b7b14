#!/usr/bin/env bash
# Prepares, once, what the kubelet end-to-end test (tests/e2e/run.sh) needs, in a cache
# outside the clone so that a second run rebuilds nothing:
#   $CACHE/bin/{kubelet,kube-apiserver,kube-controller-manager,kubectl}
#       Kubernetes 1.20.2 built from Debian 12's `kubernetes` source package with Debian's Go
#       (no registry or download ships these binaries);
#   $CACHE/images/{pause,e2e}.tar
#       a pause image (the tree's pause.c, built static) and a busybox test image, as
#       docker-archive tarballs for `ctr images import`;
# and installs the Debian packages the guest uses: etcd-server, containerd, runc.
#
# Env: VDUSE_CSI_E2E_CACHE (default /var/cache/vduse-csi-e2e).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VDUSE_CSI_E2E_CACHE:-/var/cache/vduse-csi-e2e}
BINS=(kubelet kube-apiserver kube-controller-manager kubectl)
log() { echo "e2e/prepare: $*" >&2; }

export DEBIAN_FRONTEND=noninteractive
packages=(golang-go golang-github-modern-go-reflect2-dev etcd-server containerd runc dpkg-dev rsync
    gcc libc6-dev busybox-static openssl python3 containernetworking-plugins bc)
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

mkdir -p "$CACHE/bin" "$CACHE/images"
built=1
for b in "${BINS[@]}"; do [[ -x $CACHE/bin/$b ]] || built=0; done
if ((!built)); then
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
    grep -q 'WithAuthority("localhost")' "$tree/pkg/volume/csi/csi_client.go" &&
        grep -q 'WithAuthority("localhost")' "$tree/pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go" ||
        { log "cannot apply the :authority fix to kubelet"; exit 1; }
    # Debian's own way (debian/rules): GOPATH mode through the tree's Makefile, which also
    # generates the OpenAPI and other files the tarball lacks.
    mkdir -p "$tree/.go/src/k8s.io"
    ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
    log "building ${BINS[*]} from Debian's kubernetes source (about 10 minutes on 2 cores)"
    start=$SECONDS
    # A clean environment: under `cargo test` this script inherits cargo's variables, and
    # Kubernetes' Makefile takes OUT_DIR (cargo's build-script folder) as its own output.
    (cd "$tree" && env -i PATH="$PATH" LANG=C.UTF-8 GOPATH="$tree/.go" CGO_ENABLED=0 HOME="$src/home" \
        make WHAT="$(printf 'cmd/%s ' "${BINS[@]}")" >"$src/build.log" 2>&1) ||
        { tail -20 "$src/build.log" >&2; log "build failed; log: $src/build.log"; exit 1; }
    for b in "${BINS[@]}"; do cp "$tree/_output/bin/$b" "$CACHE/bin/$b"; done
    log "built in $((SECONDS - start)) s"
    cp "$tree/build/pause/linux/pause.c" "$CACHE/pause.c"
    rm -rf "$tree" "$src/home"
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
log "ready in $CACHE"
