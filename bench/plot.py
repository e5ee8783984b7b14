#!/usr/bin/python3
"""Draws the benchmark's standing: for every fio job, and for every image storage and queue
count the run had, our best configuration's median IOPS as a ratio of the best configuration of
the best server peer (qemu-storage-daemon, rublk), as grouped bars around a line at 1x (above
it we are faster); the worst bar is the honest summary. With metrics rows in the raw data, a
second panel shows the datapath with metrics counting against without.

Usage: bench/plot.py BENCH_RAW OUT.png [TITLE]
BENCH_RAW has one line per run: "CONFIG/STORAGE/qQUEUES JOB IOPS MiB/s" (what
bench/guest-bench.sh writes). A configuration's peer is its name up to "+" (vduse-csi+wb is
ours, qsd+iothread is qsd's); "loop" is the in-kernel ceiling, not a server peer.
"""
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS = "vduse-csi"
SERVERS = {"qsd", "rublk"}


def medians(path):
    """{(config, storage, queues, job): median IOPS}, and the jobs in their first order."""
    runs = defaultdict(list)
    jobs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 4 or parts[0].count("/") != 2:
                continue
            config, storage, queues = parts[0].split("/")
            runs[(config, storage, queues, parts[1])].append(float(parts[2]))
            if parts[1] not in jobs:
                jobs.append(parts[1])
    return {k: statistics.median(v) for k, v in runs.items()}, jobs


def best(med, peers, storage, queues, job):
    """The best median of any configuration of `peers` there, and that configuration."""
    found = [
        (v, config)
        for (config, s, q, j), v in med.items()
        if s == storage and q == queues and j == job and config.split("+")[0] in peers
    ]
    return max(found, default=(0, None))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    med, jobs = medians(sys.argv[1])
    title = sys.argv[3] if len(sys.argv) > 3 else "vduse-csi against the best server peer (fio, median IOPS)"
    jobs = [j for j in jobs if any(c == OURS and j == job for (c, _, _, job) in med)]
    if not jobs:
        sys.exit(f"{sys.argv[1]}: no {OURS} rows to plot")
    groups = sorted({(s, q) for (c, s, q, _) in med if c == OURS}, key=lambda g: (g[0], int(g[1][1:])))
    metric_jobs = [j for j in jobs if any(c == "vduse-metrics" and job == j for (c, _, _, job) in med)]
    panels = 2 if metric_jobs else 1
    fig, axes = plt.subplots(panels, 1, figsize=(12, 4.8 * panels), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(groups), 1)
    worst = None
    for i, (storage, queues) in enumerate(groups):
        xs, ys, labels = [], [], []
        for x, job in enumerate(jobs):
            ours, _ = best(med, {OURS}, storage, queues, job)
            top, config = best(med, SERVERS, storage, queues, job)
            if ours and top:
                ratio = ours / top
                xs.append(x + (i - (len(groups) - 1) / 2) * width)
                ys.append(ratio)
                labels.append(f"{ratio:.2f}x\n{config}")
                if worst is None or ratio < worst[0]:
                    worst = (ratio, job, storage, queues, config)
        n = int(queues[1:])
        bars = ax.bar(xs, ys, width, label=f"image on {storage}, {n} queue{'s' if n != 1 else ''}")
        ax.bar_label(bars, labels=labels, fontsize=6, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(jobs)), jobs, rotation=15)
    ax.set_ylabel("our best IOPS / best server's best")
    if worst:
        line = f"worst row: {worst[0]:.2f}x, {worst[1]} on {worst[2]}, {worst[3][1:]} queue(s), vs {worst[4]}"
        print(line)
        title += "\n" + line
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if metric_jobs:
        ax = axes[1][0]
        ys = []
        for j in metric_jobs:
            (storage, queues) = next((s, q) for (c, s, q, job) in med if c == "vduse-metrics" and job == j)
            ys.append(med[("vduse-metrics", storage, queues, j)] / med[(OURS, storage, queues, j)])
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
