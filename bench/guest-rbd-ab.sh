#!/usr/bin/env bash
# Runs INSIDE the VDUSE guest: an A/B comparison of two configurations of our RBD device that
# holds up against the cluster's drift. The one-node Ceph's speed moves by tens of percent
# from minute to minute (and by 2x between the rounds of bench/guest-rbd-bench.sh), so a
# difference of a few percent never shows in figures taken minutes apart. Here both sides
# serve at the same time, each its own image (filled, so reads reach the OSD), and fio
# alternates between them every AB_RUN seconds, the order flipping at each pair; each pair
# gives one ratio, and the summary is the median of the pairs' ratios with its quartiles, and
# the ratio of the sums.
#
# Usage (from the checkout, on the host):
#   VDUSE_CSI_BIN=$PWD/target/release/vduse-csi GUEST_QUIET=1 \
#   GUEST_ENV="VDUSE_CSI_BIN AB_B_BIN AB_A_CEPH_ARGS AB_B_CEPH_ARGS AB_A_FLAGS AB_B_FLAGS AB_PAIRS AB_RUN AB_QD AB_JOBS" \
#   tests/guest/run.sh bench/guest-rbd-ab.sh OUT
#
#   A            VDUSE_CSI_BIN, with AB_A_CEPH_ARGS added to CEPH_ARGS and AB_A_FLAGS to `device serve`
#   B            AB_B_BIN (default: the same binary), with AB_B_CEPH_ARGS and AB_B_FLAGS
#   AB_PAIRS     pairs per job (15); AB_RUN seconds per run (2); AB_QD fio's iodepth (1)
#   AB_JOBS      fio rw modes, 4k each (default "randread randwrite")
#
# As in bench/guest-rbd-bench.sh, Ceph runs on vCPU 0 and both servers and fio on vCPU 1.
# The idle side costs nothing while the other runs: its queue threads sleep. Results:
# OUT/ab.txt (one line per pair) and OUT/ab.summary.
set -euo pipefail

BIN_A=${VDUSE_CSI_BIN:?}
BIN_B=${AB_B_BIN:-$BIN_A}
OUT=${GUEST_OUT_DIR:?}
PAIRS=${AB_PAIRS:-15}
RUN=${AB_RUN:-2}
QD=${AB_QD:-1}
read -ra JOBS <<<"${AB_JOBS:-randread randwrite}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
if (($(nproc) < 2)); then
    echo "guest-rbd-ab: needs 2 vCPUs (Ceph on one, the client side on the other)" >&2
    exit 1
fi
CEPH=/tmp/ceph
# With cephx, as bench/guest-rbd-bench.sh: both sides connect as the `profile rbd` user.
CEPH_AUTH=cephx "$here/../tests/ceph/cluster.sh" start "$CEPH"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" || true; done
    "$here/../tests/ceph/cluster.sh" stop "$CEPH"
}
trap cleanup EXIT
C=(-c "$CEPH/ceph.conf")
# shellcheck source=bench/rbd-lib.sh
source "$here/rbd-lib.sh"
pin_ceph 0

declare -A dev
# serve SIDE BIN CEPH_ARGS FLAGS: one side's image and server; sets dev[SIDE].
serve() {
    local side=$1 bin=$2 args=$3 flags=$4 out=/tmp/ab-$1.out
    filled_image "ab-$side" 256
    # shellcheck disable=SC2086 # the flags are words
    CEPH_ARGS=$args taskset -c 1 "$bin" device serve --rbd "rbd/ab-$side" --ceph-monitors 127.0.0.1:6789 \
        --ceph-user kubernetes --ceph-key-file "$CEPH/client.kubernetes.key" --name "ab$side" --queues 2 --log-level warn $flags >"$out" &
    pids+=($!)
    if ! dev[$side]=$(served_device "$out"); then
        echo "guest-rbd-ab: side $side printed no device within a minute" >&2
        exit 1
    fi
}
serve a "$BIN_A" "${AB_A_CEPH_ARGS:-}" "${AB_A_FLAGS:-}"
serve b "$BIN_B" "${AB_B_CEPH_ARGS:-}" "${AB_B_FLAGS:-}"

# iops DEV RW: one fio run's IOPS (terse v3: field 8 reads, 49 writes)
iops() {
    taskset -c 1 fio --name=ab --filename="$1" --rw="$2" --bs=4k --iodepth="$QD" --direct=1 \
        --ioengine=libaio --runtime="$RUN" --time_based --output-format=terse --terse-version=3 |
        awk -F';' -v rw="$2" '{ print (rw ~ /read/) ? $8 : $49 }'
}

: >"$OUT/ab.txt"
for rw in "${JOBS[@]}"; do
    # One unmeasured run each: the first requests of a device open objects and warm caches.
    iops "${dev[a]}" "$rw" >/dev/null
    iops "${dev[b]}" "$rw" >/dev/null
    for p in $(seq 1 "$PAIRS"); do
        if ((p % 2)); then
            a=$(iops "${dev[a]}" "$rw"); b=$(iops "${dev[b]}" "$rw")
        else
            b=$(iops "${dev[b]}" "$rw"); a=$(iops "${dev[a]}" "$rw")
        fi
        echo "$rw $p a $a b $b" | tee -a "$OUT/ab.txt"
    done
done

{
    echo "A: $BIN_A CEPH_ARGS='${AB_A_CEPH_ARGS:-}' flags '${AB_A_FLAGS:-}'"
    echo "B: $BIN_B CEPH_ARGS='${AB_B_CEPH_ARGS:-}' flags '${AB_B_FLAGS:-}'"
    echo "4k, QD$QD, ${RUN} s per run, $PAIRS pairs per job"
    for rw in "${JOBS[@]}"; do
        ratios=$(awk -v rw="$rw" '$1 == rw && $6 { printf "%.3f\n", $4 / $6 }' "$OUT/ab.txt" | sort -n)
        n=$(wc -l <<<"$ratios")
        at() { sed -n "${1}p" <<<"$ratios"; }
        sums=$(awk -v rw="$rw" '$1 == rw { s += $4; t += $6 } END { printf "%d / %d = %.3f", s, t, t ? s / t : 0 }' "$OUT/ab.txt")
        echo "$rw: A/B median of $n pair ratios $(at $(((n + 1) / 2))) (quartiles $(at $(((n + 3) / 4)))-$(at $(((3 * n + 1) / 4)))); IOPS summed $sums"
    done
} | tee "$OUT/ab.summary"
