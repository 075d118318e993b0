"""Where the server's time goes: py-spy attached to the server during a large run, a CreateRun load
and a GetRun load.

Not part of the measured figures (a sampling profiler costs the server some CPU): `--profile` runs
these as extra, unmeasured workloads after the suite and writes, per workload, a flame graph (SVG)
and a text summary of the main thread's hottest functions, inclusive and self, to bench/results/.
The summary is what docs and issues quote; the SVG is for digging.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import procs

if TYPE_CHECKING:
    from bench.run import Suite

RESULTS = procs.ROOT / "bench" / "results"


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def summarize(raw: Path, top: int = 35) -> str:
    """Top functions of the event-loop thread from py-spy's raw (collapsed) output.

    Only the main thread is counted: aiosqlite's worker threads and gRPC's poller mostly wait, and
    their samples would drown the loop, which is where a Python server's CPU ceiling is.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "MainThread" not in stack.split(";", 1)[0]:
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")[1:]]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1] if frames else "(native)"] += n
    lines = [f"main-thread samples: {total}", "", "inclusive (share of main-thread samples):"]
    lines += [f"  {100 * c / max(1, total):5.1f}%  {k}" for k, c in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * c / max(1, total):5.1f}%  {k}" for k, c in own.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: lines split one function into many rows."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def record(pid: int, name: str, seconds: float) -> subprocess.Popen[bytes]:
    """Start py-spy on a process for `seconds`, writing raw stacks to bench/results/profile_NAME.raw."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -r bench/requirements.txt)")
    argv = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100", "--threads"]
    return subprocess.Popen(
        [*argv, "--format", "raw", "--output", str(RESULTS / f"profile_{name}.raw")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _finish(spy: subprocess.Popen[bytes], name: str, header: str = "") -> None:
    spy.wait(120)
    raw = RESULTS / f"profile_{name}.raw"
    if raw.exists():
        (RESULTS / f"profile_{name}.txt").write_text(header + summarize(raw))


def profile_large_run(suite: Suite) -> None:
    """Profile a large run on SQLite (CreateRun to terminal event), then unary loads: CreateRun,
    GetRun and the bare echo they are compared with (its profile is what gRPC alone costs a call)."""
    cfg = suite.config
    with procs.evalsvc_server(procs.sqlite_url("profile-large"), "profile-large") as srv:
        spy = record(srv.pid, "large_sqlite", 60 if not cfg.quick else 10)
        args: dict[str, Any] = {
            "mode": "large",
            **srv.target(),
            "items": cfg.large_items,
            "graders": cfg.large_graders,
            "timeout_s": 300,
        }
        procs.run_child("bench.loadgen", args, timeout_s=330)
        srv.stop()
        _finish(spy, "large_sqlite")
    with procs.evalsvc_server(procs.sqlite_url("profile-create"), "profile-create") as srv:
        _profile_unary(srv, "create_run", "create")
    with procs.evalsvc_server(procs.sqlite_url("profile-get"), "profile-get") as srv:
        _profile_unary(srv, "get_run", "get")
    with procs.echo_server("profile-echo") as srv:
        _profile_unary(srv, "echo", "echo")


def _profile_unary(server: procs.ServerProcess, name: str, kind: str) -> None:
    """py-spy a server for 5 s of a 6 s unary load (32 in flight); the summary's first line gives the
    calls/s, so a call's share of the loop can be worked out (busy share / calls per second)."""
    spy = record(server.pid, name, 5)
    args = {"mode": "unary", **server.target(), "kind": kind, "concurrency": 32, "duration_s": 6}
    result = procs.run_child("bench.loadgen", {**args, "max_calls": 200_000}, timeout_s=60)
    _finish(spy, name, f"{kind}: {result['rps']:,.0f} calls/s under the profiler\n")
