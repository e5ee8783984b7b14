#!/usr/bin/env bash
# A one-node Ceph cluster for the RBD tests: one mon, one mgr and one BlueStore OSD on a
# sparse file, bound to 127.0.0.1 only, everything under one scratch directory. By default
# without authentication; CEPH_AUTH=cephx turns cephx on.
#
# Usage: [CEPH_AUTH=none|cephx] [CEPH_MGR=0] tests/ceph/cluster.sh start DIR
#                                          # prints nothing; DIR/ceph.conf is the client config
#        tests/ceph/cluster.sh stop DIR    # kills the daemons, removes DIR
#        tests/ceph/cluster.sh stop-osd DIR   # stops the one OSD: every placement group inactive
#        tests/ceph/cluster.sh start-osd DIR  # starts it again; returns once it is up
#
# CEPH_MGR=0 starts no ceph-mgr: RBD I/O, images, snapshots, clones, locks and blocklists
# need only the mon and the OSD (placement group statistics and `ceph -s` need the mgr).
#
# With CEPH_AUTH=cephx, DIR/ceph.conf still works for the ceph and rbd CLIs as client.admin
# (its key is DIR/client.admin.keyring, found through the "keyring" setting), and the user
# client.kubernetes (caps "profile rbd", limited to the pool rbd) is made for the CSI driver;
# its bare key is in DIR/client.kubernetes.key.
#
# The pool is "rbd". Runs on the host or in the test guest (Debian's ceph-mon, ceph-mgr,
# ceph-osd and ceph-common); under TCG the cluster is up in about 40 s. A start whose OSD does
# not come up is retried from scratch (twice), with the OSD's log shown.
set -euo pipefail

log() { echo "ceph/cluster: $*" >&2; }
die() {
    log "$*"
    exit 1
}

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || die "usage: [CEPH_AUTH=none|cephx] $0 start|stop|stop-osd|start-osd DIR"
auth=${CEPH_AUTH:-none}
[[ $auth == none || $auth == cephx ]] || die "CEPH_AUTH must be none or cephx, not $auth"

stop() {
    local pidfile
    for pidfile in "$dir"/run/*.pid; do
        [[ -e $pidfile ]] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    # Daemons that died before writing a pid file are found by their config path.
    pkill -9 -f -- "-c $dir/ceph.conf" 2>/dev/null || true
    rm -rf -- "$dir"
}

# Runs the ceph CLI against this cluster, with a bound so a dead mon cannot hang a test.
ceph_cli() { timeout 120 ceph -c "$dir/ceph.conf" --connect-timeout 60 "$@"; }

start_once() {
    mkdir -p "$dir"/{run,log,mon-a,mgr-x,osd-0}
    dir=$(realpath "$dir")
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    # Under cephx every entity finds its own keyring as DIR/<name>.keyring (client.admin's for
    # the CLIs, mgr.x's, osd.0's); a client given --key (client.kubernetes) needs no file. The
    # mon reads its key from its data directory, where --mkfs copies it.
    local keyring=$dir/keyring
    [[ $auth == none ]] || keyring="$dir/\$name.keyring"
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:3300,v1:127.0.0.1:6789
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
keyring = $keyring
# A killed client's watch (and so its exclusive lock) is seen as dead after this long.
osd client watch timeout = 10
mon data = $dir/mon-\$id
mgr data = $dir/mgr-\$id
osd data = $dir/osd-\$id
osd objectstore = bluestore
bluestore block create = true
# Smaller than the test guest's /tmp (a 1500 MiB tmpfs, RAM): BlueStore then reuses the space
# it frees. A larger sparse file keeps taking fresh tmpfs pages for new extents until the
# tmpfs is full and the OSD's writes fail.
bluestore block size = 1073741824
# RocksDB's WAL lives in BlueFS on that same GiB. Ceph's defaults let it reach 1 GiB (4
# memtables of 256 MiB, max_total_wal_size 1 GiB), and a file-backed OSD counts as a disk, so
# every write up to 64 KiB is deferred through that WAL: the RBD benchmark's 4k random writes
# filled it, BlueFS found no space, and the OSD aborted ("unrecognized error code" in
# BlueRocksEnv.cc) with every client's I/O left waiting. The defaults, with a WAL bounded to
# 128 MiB and 2 memtables of 32 MiB.
bluestore rocksdb options = compression=kNoCompression,max_write_buffer_number=2,min_write_buffer_number_to_merge=1,recycle_log_file_num=2,write_buffer_size=33554432,writable_file_max_buffer_size=0,compaction_readahead_size=2097152,max_background_compactions=2,max_total_wal_size=134217728
bluestore fsck on mkfs = false
bluestore cache size = 67108864
osd memory target = 536870912
osd max object name len = 256
osd max object namespace len = 64
EOF
    monmaptool --create --clobber --add a 127.0.0.1 --fsid "$fsid" "$dir/monmap" >/dev/null
    local mkfs_keyring=()
    if [[ $auth == cephx ]]; then
        # The mon's auth database starts from the keyring given to its --mkfs: the mon's own
        # key and client.admin's, so the CLI can make every other key through the mon.
        ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
        ceph-authtool --create-keyring "$dir/mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool "$dir/mon.a.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
        mkfs_keyring=(--keyring "$dir/mon.a.keyring")
    fi
    ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" "${mkfs_keyring[@]}" >/dev/null
    ceph-mon -c "$dir/ceph.conf" -i a 2>>"$dir/log/mon.stderr"
    if [[ ${CEPH_MGR:-1} != 0 ]]; then
        if [[ $auth == cephx ]]; then
            # The mgr cannot log in without its key, so it is made (by the mon) before the mgr starts.
            ceph_cli auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
                -o "$dir/mgr.x.keyring" || { log "no key for mgr.x"; return 1; }
        fi
        ceph-mgr -c "$dir/ceph.conf" -i x 2>>"$dir/log/mgr.stderr"
    fi
    local id
    id=$(ceph_cli osd create)
    [[ $id == 0 ]] || die "expected osd id 0, got $id"
    # Under cephx the OSD gets its key from --mkkey; without one it cannot log in to fetch the
    # mon's config, which ceph.conf holds all of anyway, so it skips that.
    local mkkey=()
    [[ $auth == none ]] || mkkey=(--mkkey --no-mon-config)
    ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs "${mkkey[@]}" >/dev/null 2>&1 || { log "ceph-osd --mkfs failed"; return 1; }
    if [[ $auth == cephx ]]; then
        # --mkkey wrote the OSD's new key to DIR/osd.0.keyring; the mon must know it (with the
        # OSD's caps) before the OSD can boot.
        ceph_cli auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
            -i "$dir/osd.0.keyring" >/dev/null 2>&1 || { log "ceph auth add osd.0 failed"; return 1; }
    fi
    ceph-osd -c "$dir/ceph.conf" -i 0 2>>"$dir/log/osd.0.stderr"
    ceph_cli osd crush add osd.0 1.0 host=localhost root=default >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 90; i++)); do
        ceph_cli osd stat 2>/dev/null | grep -q "1 up" && break
        sleep 1
    done
    ((i < 90)) || { log "osd.0 did not come up"; return 1; }
    ceph_cli osd pool create rbd 8 >/dev/null 2>&1
    timeout 120 rbd -c "$dir/ceph.conf" pool init rbd
    if [[ $auth == cephx ]]; then
        # The CSI driver's user, with the caps ceph-csi documents for RBD: images, snapshots and
        # clones in the pool rbd, and nothing more. Made after the pool, which "profile rbd
        # pool=rbd" names.
        ceph_cli auth get-or-create client.kubernetes mon 'profile rbd' osd 'profile rbd pool=rbd' \
            mgr 'profile rbd pool=rbd' >/dev/null || { log "no key for client.kubernetes"; return 1; }
        ceph_cli auth get-key client.kubernetes >"$dir/client.kubernetes.key" ||
            { log "ceph auth get-key client.kubernetes failed"; return 1; }
    fi
    log "cluster up in $dir (fsid $fsid)"
}

start() {
    [[ ! -e $dir/ceph.conf ]] || die "$dir already holds a cluster"
    local attempt
    for attempt in 1 2 3; do
        start_once && return 0
        log "attempt $attempt failed; the OSD's log ends:"
        tail -n 20 "$dir"/log/osd.0.log "$dir"/log/osd.0.stderr >&2 2>/dev/null || true
        stop
    done
    die "no cluster after 3 attempts"
}

# A sick pool, as users meet one: the only OSD goes away (it tells the mon it goes down, so its
# placement groups are inactive at once), and every I/O to the pool waits.
stop_osd() {
    local pid
    pid=$(cat "$dir/run/osd.0.pid") || die "no OSD pid file in $dir/run"
    kill -TERM "$pid"
    local i
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    for ((i = 0; i < 60; i++)); do
        ceph_cli osd stat 2>/dev/null | grep -q "0 up" && return 0
        sleep 1
    done
    die "osd.0 is still up for the mon"
}

start_osd() {
    ceph-osd -c "$dir/ceph.conf" -i 0 2>>"$dir/log/osd.0.stderr"
    local i
    for ((i = 0; i < 90; i++)); do
        ceph_cli osd stat 2>/dev/null | grep -q "1 up" && return 0
        sleep 1
    done
    die "osd.0 did not come back up"
}

case $cmd in
start) start ;;
stop) stop ;;
stop-osd) stop_osd ;;
start-osd) start_osd ;;
*) die "unknown command $cmd" ;;
esac
