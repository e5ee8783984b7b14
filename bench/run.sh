#!/usr/bin/env bash
# Benchmark: fio on `vduse-csi device serve` vs qemu-storage-daemon's vduse-blk export vs the
# kernel loop device, same image, same jobs, one guest boot (DESIGN.md "Benchmarks").
# Prints a table of IOPS and MiB/s with our ratio to each peer. It never fails on figures.
#
# Usage: bench/run.sh   (env: BENCH_RUNTIME seconds per job, BENCH_SIZE_MB, BENCH_QUEUES,
#                       BENCH_PEERS, a subset of "vduse-csi qsd loop")
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release --quiet
export VDUSE_CSI_BIN=$repo/target/release/vduse-csi
export GUEST_ENV="VDUSE_CSI_BIN BENCH_RUNTIME BENCH_SIZE_MB BENCH_QUEUES BENCH_PEERS"
export GUEST_QUIET=1
out=$repo/target/guest/bench
rm -rf "$out"
tests/guest/run.sh bench/guest-bench.sh "$out" >&2
echo "fio, libaio, direct I/O, ${BENCH_RUNTIME:-8} s per job, ${BENCH_QUEUES:-1} queue(s), image on guest tmpfs; IOPS per job:"
cat "$out/bench.table"
