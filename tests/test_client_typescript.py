"""The TypeScript example (clients/typescript: protoc-gen-es messages, @connectrpc/connect-node gRPC transport)
creates a run against a live server and watches it to the end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import ServerProcess

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


def test_typescript_example_without_a_key_says_how_to_get_one() -> None:
    """It sent an empty key and failed UNAUTHENTICATED."""
    _build()
    env = {k: v for k, v in os.environ.items() if k != "EVALSVC_API_KEY"}
    done = subprocess.run(
        ["node", "dist/example.js", "127.0.0.1:1"], cwd=TS_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "set EVALSVC_API_KEY" in done.stderr and "evalsvc keys create" in done.stderr
