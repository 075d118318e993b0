"""PNG plots of the latest run: throughput and latency distributions (matplotlib, Agg backend).

Plots show every repetition rather than only the medians in the table, so a reader can see whether
a ratio comes from a stable distribution or from one outlier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAMES = ("throughput.png", "latency.png", "memory.png")  # the files this module writes, and only those


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    n = len(ordered)
    ax.plot(ordered, [(i + 1) / n for i in range(n)], label=f"{label} (n={n:,})")


def throughput(samples: dict[str, Any], out: Path) -> None:
    """Unary calls/s per repetition, and completed evaluations over time in the large runs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    unary = samples.get("unary")
    if unary:
        kinds = [("echo", "bare echo"), ("get", "GetRun"), ("create", "CreateRun")]
        for x, (kind, _label) in enumerate(kinds):
            values = unary["rps"].get(kind, [])
            if values:
                left.bar(x, sorted(values)[len(values) // 2], color="C0" if kind == "echo" else "C1", alpha=0.6)
                left.scatter([x] * len(values), values, color="k", s=12, zorder=3)
        left.set_xticks(range(len(kinds)), [label for _, label in kinds])
        left.set_ylabel("calls/s")
        left.set_title(f"Unary throughput, {unary['concurrency']} calls in flight (bars: median, dots: reps)")
    for key, label, color in (("large_sqlite", "SQLite", "C2"), ("large_postgres", "PostgreSQL", "C3")):
        data = samples.get(key)
        if not data:
            continue
        for i, timeline in enumerate(data["timelines"]):
            xs = [t for t, _ in timeline]
            ys = [c for _, c in timeline]
            right.plot(xs, ys, color=color, alpha=0.8, label=label if i == 0 else None)
    right.set_xlabel("seconds since CreateRun (client)")
    right.set_ylabel("results received by the watcher")
    right.set_title("Large run: progress seen through WatchRun")
    if right.lines:
        right.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def latency(samples: dict[str, Any], out: Path) -> None:
    """CDFs of unary call latency and of watch delivery latency, evalsvc against its baseline."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    unary = samples.get("unary")
    if unary:
        for kind, label in (("echo", "bare echo"), ("get", "GetRun"), ("create", "CreateRun")):
            _cdf(left, unary["latency_ms"].get(kind, []), label)
        left.set_xscale("log")
        left.set_xlabel("call latency, ms (log)")
        left.set_ylabel("fraction of calls")
        left.set_title(f"Unary latency at {unary['concurrency']} in flight")
        left.legend()
    fan = samples.get("fanout")
    if fan:
        _cdf(right, fan["latency_ms"].get("bare", []), "bare grpc.aio broadcast")
        _cdf(right, fan["latency_ms"].get("evalsvc", []), "evalsvc WatchRun")
        right.set_xlabel("commit (or publish) to delivery, ms")
        right.set_ylabel("fraction of deliveries")
        right.set_title(f"Fan-out: {fan['watchers']:,} watchers x {fan['events']} events")
        right.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def memory(samples: dict[str, Any], out: Path) -> None:
    """Server RSS per idle stream, per repetition."""
    idle = samples.get("idle")
    if not idle:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, (key, _label) in enumerate((("bare", "bare idle stream"), ("evalsvc", "idle WatchRun"))):
        values = idle.get(key, [])
        if values:
            ax.bar(x, sorted(values)[len(values) // 2], alpha=0.6, color=f"C{x}")
            ax.scatter([x] * len(values), values, color="k", s=12, zorder=3)
    ax.axhline(40, color="r", linestyle="--", linewidth=1, label="target 40 KiB")
    ax.set_xticks([0, 1], ["bare idle stream", "idle WatchRun"])
    ax.set_ylabel("server RSS per stream, KiB")
    ax.set_title("Idle stream memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)


def write_all(samples: dict[str, Any], out: Path) -> None:
    """Write every plot whose data the run has."""
    throughput(samples, out)
    latency(samples, out)
    memory(samples, out)
