"""The Go example (clients/go: protoc-gen-go and protoc-gen-go-grpc output) builds offline with Debian's Go
toolchain and packages (clients/go/build.sh, which also loads every generated package beside grpc's status package
and genproto's errdetails), then creates a run against a live server and watches it to the end; its test decodes a
real BadRequest with errdetails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import ServerProcess

GO_DIR = Path(__file__).resolve().parent.parent / "clients" / "go"
DEBIAN_GO = Path("/usr/share/gocode/src")
_APIV1_MOD = DEBIAN_GO / "github.com" / "golang" / "protobuf" / "go.mod"


def _debian_go_ready() -> bool:
    """golang-go, grpc's and genproto's sources, and github.com/golang/protobuf 1.5 (1.3 crashes on APIv2 messages)."""
    return (
        shutil.which("go") is not None
        and (DEBIAN_GO / "google.golang.org" / "grpc").is_dir()
        and (DEBIAN_GO / "google.golang.org" / "genproto" / "googleapis" / "rpc" / "errdetails").is_dir()
        and _APIV1_MOD.is_file()
        and "google.golang.org/protobuf" in _APIV1_MOD.read_text()
    )


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _debian_go_ready(),
        reason=(
            "needs Debian's golang-go, golang-google-grpc-dev, golang-google-genproto-dev and"
            " golang-github-golang-protobuf-1-5-dev"
        ),
    ),
]


def test_go_example_builds_offline_and_watches_a_run(tmp_path: Path) -> None:
    binary = tmp_path / "example"
    subprocess.run([str(GO_DIR / "build.sh"), str(binary)], check=True, timeout=300)
    # Without a key it sent "Bearer " and failed Unauthenticated, exit 1; it says how to get one, as the
    # TypeScript example does.
    env = {k: v for k, v in os.environ.items() if k != "EVALSVC_API_KEY"}
    keyless = subprocess.run([str(binary), "127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=60)
    assert keyless.returncode == 2, keyless.stderr
    assert "set EVALSVC_API_KEY" in keyless.stderr and "evalsvc keys create" in keyless.stderr
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'go.db'}", tmp_path / "server.log")
    try:
        key = server.bootstrap_key()
        assert key
        done = subprocess.run(
            [str(binary), server.target],
            env={**os.environ, "EVALSVC_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=60,
        )
        # The generated google/rpc package panicked at init ("google/rpc/status.proto is already registered")
        # beside grpc, so Go code could not read ErrorInfo or BadRequest; it uses genproto's errdetails now.
        details = subprocess.run(
            [f"{binary}.test", "-test.v", "-test.run", "TestDescribeDecodesBadRequest"],
            env={**os.environ, "EVALSVC_API_KEY": key, "EVALSVC_TEST_TARGET": server.target},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        assert server.terminate() == 0
    assert done.returncode == 0, done.stderr
    assert details.returncode == 0 and "--- PASS: TestDescribeDecodesBadRequest" in details.stdout, details.stdout
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"created run_\w+ with 3 jobs", lines[0])
    seqs = [int(m.group(1)) for line in lines if (m := re.match(r"#(\d+) ", line))]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "run SUCCEEDED (3/3)" in lines[-2]
    assert lines[-1] == "pass rate 67%, overall passed: false"
