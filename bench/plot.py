#!/usr/bin/python3
"""Draws the benchmark's standing: for every fio job, our device's median IOPS as a ratio of
each peer's (qemu-storage-daemon, rublk, the kernel loop device), as grouped bars around a line
at 1x (above it we are faster). With metrics rows in the raw data, a second panel shows the
datapath with metrics counting against without.

Usage: bench/plot.py BENCH_RAW OUT.png [TITLE]
BENCH_RAW has one line per run: "TARGET JOB IOPS MiB/s" (what bench/guest-bench.sh writes).
"""
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PEERS = [("qsd", "qemu-storage-daemon"), ("rublk", "rublk (ublk)"), ("loop", "kernel loop")]


def medians(path):
    runs = defaultdict(list)
    jobs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 4:
                continue
            target, job, iops = parts[0], parts[1], float(parts[2])
            runs[(target, job)].append(iops)
            if job not in jobs:
                jobs.append(job)
    return {k: statistics.median(v) for k, v in runs.items()}, jobs


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    med, jobs = medians(sys.argv[1])
    title = sys.argv[3] if len(sys.argv) > 3 else "vduse-csi against its peers (fio, median IOPS)"
    jobs = [j for j in jobs if ("vduse-csi", j) in med]
    if not jobs:
        sys.exit(f"{sys.argv[1]}: no vduse-csi rows to plot")
    peers = [(p, label) for p, label in PEERS if any((p, j) in med for j in jobs)]
    metric_jobs = [j for j in jobs if ("vduse-metrics", j) in med]
    panels = 2 if metric_jobs else 1
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4.5 * panels), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(peers), 1)
    for i, (peer, label) in enumerate(peers):
        xs, ys = [], []
        for x, job in enumerate(jobs):
            if med.get((peer, job)):
                xs.append(x + (i - (len(peers) - 1) / 2) * width)
                ys.append(med[("vduse-csi", job)] / med[(peer, job)])
        bars = ax.bar(xs, ys, width, label=f"vs {label}")
        ax.bar_label(bars, labels=[f"{y:.2f}x" for y in ys], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(jobs)), jobs, rotation=15)
    ax.set_ylabel("vduse-csi IOPS / peer IOPS")
    ax.set_title(title)
    ax.legend()
    if metric_jobs:
        ax = axes[1][0]
        ys = [med[("vduse-metrics", j)] / med[("vduse-csi", j)] for j in metric_jobs]
        bars = ax.bar(range(len(metric_jobs)), ys, 0.5, color="tab:gray")
        ax.bar_label(bars, labels=[f"{y:.3f}x" for y in ys], fontsize=8, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(metric_jobs)), metric_jobs, rotation=15)
        ax.set_ylim(0, max(1.2, max(ys) * 1.1))
        ax.set_ylabel("IOPS with metrics / without")
        ax.set_title("cost of counting: metrics on against off")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
