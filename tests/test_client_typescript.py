"""The TypeScript example (clients/typescript: protoc-gen-es messages, @connectrpc/connect-node gRPC transport)
creates a run against a live server and watches it to the end, resuming across a kill -9 of the server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.procs import ServerProcess, free_port

TS_DIR = Path(__file__).resolve().parent.parent / "clients" / "typescript"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
    ),
]


def _build() -> None:
    if not (TS_DIR / "node_modules" / ".bin" / "tsc").exists():
        # npm install (not ci; this registry lacks some platforms' optional packages) from the committed lockfile,
        # never rewriting it.
        subprocess.run(
            ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=TS_DIR,
            check=True,
            timeout=300,
        )
    subprocess.run(
        [str(TS_DIR / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], cwd=TS_DIR, check=True, timeout=120
    )


def test_typescript_example_creates_and_watches_a_run(tmp_path: Path) -> None:
    _build()
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'ts.db'}", tmp_path / "server.log")
    try:
        key = server.bootstrap_key()
        assert key
        done = subprocess.run(
            ["node", "dist/example.js", server.target],
            cwd=TS_DIR,
            env={**os.environ, "EVALSVC_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        assert server.terminate() == 0
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"created run_\w+ with 3 jobs", lines[0])
    seqs = [int(m.group(1)) for line in lines if (m := re.match(r"#(\d+) ", line))]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "run SUCCEEDED (3/3)" in lines[-2]
    assert lines[-1] == "pass rate 67%, overall passed: false"


def test_typescript_example_resumes_its_watch_across_kill_9_and_restart(tmp_path: Path) -> None:
    """connect-node reports the connection a killed server dropped as Canceled, which the example did not resume
    (it exited 1). No workers at first: the run stays PENDING, so the kill lands mid-watch."""
    _build()
    db = f"sqlite+aiosqlite:///{tmp_path / 'ts.db'}"
    port = free_port()
    first = ServerProcess(db, tmp_path / "first.log", "--grpc-addr", f"127.0.0.1:{port}", "--workers", "0")
    second: ServerProcess | None = None
    key = first.bootstrap_key()
    assert key and first.port == port
    example = subprocess.Popen(
        ["node", "dist/example.js", first.target],
        cwd=TS_DIR,
        env={**os.environ, "EVALSVC_API_KEY": key},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert example.stdout is not None
        lines = [example.stdout.readline(), example.stdout.readline()]
        assert lines[1].startswith("#1 run PENDING"), lines
        first.kill()  # the watch's connection drops; reconnects are refused until the restart
        second = ServerProcess(db, tmp_path / "second.log", "--grpc-addr", f"127.0.0.1:{port}", "--workers", "2")
        out, err = example.communicate(timeout=60)
    finally:
        if example.poll() is None:
            example.kill()
            example.wait()
        if first.proc.poll() is None:
            first.kill()
        if second is not None:
            assert second.terminate() == 0
    assert example.returncode == 0, err
    lines += out.splitlines(keepends=True)
    seqs = [int(m.group(1)) for line in lines if (m := re.match(r"#(\d+) ", line))]
    assert seqs == list(range(1, len(seqs) + 1))  # every seq once, in order, across the restart
    assert "run SUCCEEDED (3/3)" in lines[-2]
    assert lines[-1].rstrip("\n") == "pass rate 67%, overall passed: false"


def test_typescript_example_stops_on_ctrl_c_without_resuming(tmp_path: Path) -> None:
    """Its own abort is Canceled too, like a dropped connection; that one is not resumed."""
    _build()
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'ts.db'}", tmp_path / "server.log", "--workers", "0")
    try:
        key = server.bootstrap_key()
        assert key
        example = subprocess.Popen(
            ["node", "dist/example.js", server.target],
            cwd=TS_DIR,
            env={**os.environ, "EVALSVC_API_KEY": key},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert example.stdout is not None
        assert example.stdout.readline().startswith("created run_")
        assert example.stdout.readline().startswith("#1 run PENDING")
        example.send_signal(signal.SIGINT)
        _, err = example.communicate(timeout=30)
    finally:
        assert server.terminate() == 0
    assert example.returncode == 130 and err == "example: interrupted; the run goes on on the server\n", err


def test_typescript_example_without_a_key_says_how_to_get_one() -> None:
    """It sent an empty key and failed UNAUTHENTICATED."""
    _build()
    env = {k: v for k, v in os.environ.items() if k != "EVALSVC_API_KEY"}
    done = subprocess.run(
        ["node", "dist/example.js", "127.0.0.1:1"], cwd=TS_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "set EVALSVC_API_KEY" in done.stderr and "evalsvc keys create" in done.stderr
