#!/usr/bin/env bash
# Benchmark (DESIGN.md "Benchmarks"; prints figures, never fails on them):
#  1. a host microbenchmark of the queue engine (mock driver, null backend): requests/s/core;
#  2. in one guest boot, interleaved rounds of the same fio jobs on the same data through
#     `vduse-csi device serve`, qemu-storage-daemon's vduse-blk export, rublk's ublk loop
#     target and the kernel loop device: every server at its defaults and at its best flags,
#     at one queue and at BENCH_QUEUES, with the image on tmpfs and on ext4 over a block
#     device (where O_DIRECT is real); the tables show medians, the server's CPU seconds per
#     100k requests, and our best against the best server's best, with the worst row
#     (bench/guest-bench.sh says every configuration);
#  3. in a second boot, the RBD rows: a one-node Ceph in the guest, one image, the same jobs
#     through our device on librbd, the kernel's RBD client (krbd) and rbd-nbd
#     (bench/guest-rbd-bench.sh; BENCH_RBD=0 skips it, BENCH_RBD_SIZE_MB sizes the image;
#     BENCH_MAIN=0 runs it alone). The Ceph daemons run on vCPU 0 and the client side on
#     vCPU 1 (BENCH_PIN=0: unpinned), and a second table gives CPU seconds per 100k requests;
#     BENCH_RBD_TUNED="CEPH_ARGS" adds our device with those librados options as a fourth;
#     BENCH_RBD_BASELINE_BIN=PATH adds our device served by another build (A/B in one boot);
#     the cluster runs with cephx (BENCH_CEPH_AUTH=none: without);
#     BENCH_RBD_DEVICES (default "vduse_rbd librbd krbd rbd_nbd null") picks the others (librbd:
#     fio's librbd engine, no block device, the userspace ceiling; null: our frontend alone,
#     which with librbd's row bounds ours); BENCH_PERF="JOB..." adds
#     a round sampled by perf during those jobs, reported by thread and function (bench.perf);
#     a job that has not ended BENCH_STALL_SECONDS (120) after its time leaves Ceph's view of
#     it in stall-DEVICE-JOB.txt, and ends the boot there;
#  4. with BENCH_FRONTEND=1, a third boot (bench/guest-frontend.sh): the storage-free
#     frontends (ours at its defaults, with --rotate-irqs, without polling, with rq_affinity
#     0 and 2, and rublk's null target; FRONTEND_TARGETS picks ours) at 1, 2 and 4 queues
#     (FRONTEND_QUEUES), 4k and 1 MiB jobs (FRONTEND_JOBS picks by name), then per-request
#     counts from /proc (server and guest CPU, context
#     switches; FRONTEND_PERF_STAT=1 adds perf stat's workqueue items and system calls, which
#     can crash the TCG guest) and a perf profile of the one-queue rows.
#
# Usage: bench/run.sh [--plot FILE.png]
#        (env: BENCH_RUNTIME seconds per job (5), BENCH_ROUNDS (3), BENCH_SIZE_MB (512),
#        BENCH_QUEUES, the default queue count (2), BENCH_PEERS, a subset of
#        "vduse-csi qsd rublk loop metrics" ("metrics" reruns our 4k jobs with the metrics
#        endpoint counting), BENCH_STORAGE ("tmpfs ext4"), BENCH_JOBS (a subset of the job
#        names; all by default), BENCH_VARIANT (arguments of one more configuration of
#        ours, "vduse-csi+variant", for an A/B inside one boot))
# --plot draws the table as ratios (bench/plot.py, matplotlib) into FILE.png.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
plot=
while (($#)); do
    case $1 in
    --plot) plot=$(realpath -m -- "${2:?--plot needs a file name}"); shift 2 ;;
    *) echo "usage: bench/run.sh [--plot FILE.png]" >&2; exit 2 ;;
    esac
done
cd "$repo"
if [[ -n $plot ]] && ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
    apt-get install -y -qq --no-install-recommends python3-matplotlib >/dev/null
fi

# rublk (crates.io) needs libclang to build; the guest sees /usr/local/bin, not ~/.cargo/bin.
# Only the main rows use it.
if [[ ${BENCH_MAIN:-1} != 0 || ${BENCH_FRONTEND:-0} != 0 ]] && ! command -v rublk >/dev/null; then
    if ! dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "install ok installed"; then
        apt-get install -y -qq --no-install-recommends libclang-dev >/dev/null
    fi
    cargo install --quiet --locked rublk
    cp "$(command -v rublk || echo "$HOME/.cargo/bin/rublk")" /usr/local/bin/rublk
fi

# perf, for BENCH_PERF and the frontend boot; Debian's linux-perf runs on the guest's kernel too.
if [[ -n ${BENCH_PERF:-} || ${BENCH_FRONTEND:-0} != 0 ]] && ! command -v perf >/dev/null; then
    apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
fi

# The RBD rows need a one-node Ceph and the two kernel-side peers' tools in the guest.
if [[ ${BENCH_RBD:-1} != 0 ]]; then
    missing=()
    for p in ceph-mon ceph-mgr ceph-osd ceph-common rbd-nbd; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

cargo build --release --quiet
export VDUSE_CSI_BIN=$repo/target/release/vduse-csi
export GUEST_ENV="VDUSE_CSI_BIN BENCH_RUNTIME BENCH_ROUNDS BENCH_SIZE_MB BENCH_QUEUES BENCH_PEERS BENCH_STORAGE BENCH_JOBS BENCH_VARIANT"
export GUEST_QUIET=1
out=$repo/target/guest/bench
if [[ ${BENCH_MAIN:-1} != 0 ]]; then
    cargo bench --quiet --bench engine 2>/dev/null | tee "$repo/target/engine-bench.txt"
    rm -rf "$out"
    # The tmpfs image and the ext4 one's backing file both live in the guest's /tmp.
    GUEST_TMP_SIZE=${GUEST_TMP_SIZE:-2000m} GUEST_TIMEOUT=${GUEST_TIMEOUT:-7200} tests/guest/run.sh bench/guest-bench.sh "$out" >&2
    echo "fio, libaio, direct I/O, ${BENCH_RUNTIME:-5} s per job, median of ${BENCH_ROUNDS:-3} interleaved rounds:"
    cat "$out/bench.table"
    echo
    echo "Where the CPU goes (the server, and the rest of the guest over the same span):"
    cat "$out/bench.split"
fi
if [[ ${BENCH_RBD:-1} != 0 ]]; then
    rbd_out=$repo/target/guest/bench-rbd
    rm -rf "$rbd_out"
    # Five devices × 3 rounds and a perf round took longer than run.sh's 20-minute default.
    GUEST_TIMEOUT=${GUEST_TIMEOUT:-3600} GUEST_ENV="$GUEST_ENV BENCH_RBD_SIZE_MB BENCH_PIN BENCH_CEPH_AUTH BENCH_RBD_TUNED BENCH_RBD_BASELINE_BIN BENCH_RBD_DEVICES BENCH_PERF BENCH_STALL_SECONDS" \
        tests/guest/run.sh bench/guest-rbd-bench.sh "$rbd_out" >&2
    echo
    echo "RBD (one-node Ceph in the guest, BlueStore on a file), same jobs, median of ${BENCH_ROUNDS:-3} rounds; IOPS:"
    cat "$rbd_out/bench.table"
fi
if [[ ${BENCH_FRONTEND:-0} != 0 ]]; then
    fe_out=$repo/target/guest/bench-frontend
    rm -rf "$fe_out"
    GUEST_TIMEOUT=${GUEST_TIMEOUT:-3600} GUEST_ENV="$GUEST_ENV FRONTEND_QUEUES FRONTEND_TARGETS FRONTEND_JOBS FRONTEND_PERF_STAT" tests/guest/run.sh bench/guest-frontend.sh "$fe_out" >&2
    echo
    echo "Storage-free frontends, median of ${BENCH_ROUNDS:-3} rounds; IOPS (1 MiB rows: MiB/s):"
    cat "$fe_out/bench.frontend"
    echo
    echo "Per request, one more round (perf stat and /proc over the span fio counts):"
    cat "$fe_out/bench.frontend-counts"
    echo
    echo "Profiles: $fe_out/bench.frontend-perf"
fi
if [[ -n $plot && ${BENCH_MAIN:-1} != 0 ]]; then
    bench/plot.py "$out/bench.raw" "$plot" \
        "vduse-csi against its peers: fio ${BENCH_RUNTIME:-5} s per job, median of ${BENCH_ROUNDS:-3} rounds, TCG guest"
fi
