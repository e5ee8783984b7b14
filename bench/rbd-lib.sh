# Sourced by the guest's RBD benchmark scripts (bench/guest-rbd-bench.sh, bench/guest-rbd-ab.sh):
# the one-node Ceph's setup they share. Needs C (the rbd CLI's `-c CONF` words).

# pin_ceph CPU: every thread of the Ceph daemons onto that CPU, away from the client side.
pin_ceph() {
    local daemon pid
    for daemon in ceph-mon ceph-mgr ceph-osd; do
        for pid in $(pgrep -x "$daemon"); do taskset -apc "$1" "$pid" >/dev/null; done
    done
}

# filled_image NAME MIB: a new image in the pool rbd, written in full, so that reads fetch
# data from the OSD rather than answering holes with zeroes.
filled_image() {
    rbd "${C[@]}" create --size "${2}M" "rbd/$1"
    rbd "${C[@]}" bench --io-type write --io-size 4M --io-threads 4 --io-pattern seq \
        --io-total "${2}M" "rbd/$1" >/dev/null
}

# served_device OUT: the device a starting `device serve` prints first into the file OUT,
# waiting up to a minute for it; fails (printing nothing) if none came.
served_device() {
    local i dev
    for i in $(seq 1 600); do [[ -s $1 ]] && break; sleep 0.1; done
    dev=$(head -n1 "$1" 2>/dev/null || true)
    [[ $dev == /dev/* ]] || return 1
    echo "$dev"
}
