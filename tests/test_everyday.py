"""The first hour of a new user: `make run`'s addresses, what the server says about keys on later starts and
when it cannot listen, the errors a missing key gets (gRPC, REST, the SDK), and docs that stand on their own."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests.procs import ServerProcess, evalsvc_run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))


def make_run_command(variables: list[str], env: dict[str, str]) -> str:
    """The serve command `make run` would run (make -n: nothing runs)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EVALSVC_", "GRPC_ADDR", "HTTP_ADDR"))}
    out = subprocess.run(
        ["make", "-n", "run", *variables], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if "evalsvc serve" in line)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_addresses_from_variables_then_environment_then_defaults() -> None:
    assert make_run_command([], {}).endswith("serve --grpc-addr 127.0.0.1:50051 --http-addr 127.0.0.1:8080")
    from_env = make_run_command([], {"EVALSVC_GRPC_ADDR": "127.0.0.1:7001", "EVALSVC_HTTP_ADDR": "127.0.0.1:7080"})
    assert from_env.endswith("--grpc-addr 127.0.0.1:7001 --http-addr 127.0.0.1:7080")
    given = make_run_command(
        ["GRPC_ADDR=0.0.0.0:6000", "HTTP_ADDR=127.0.0.1:6080"], {"EVALSVC_GRPC_ADDR": "127.0.0.1:7001"}
    )
    assert given.endswith("--grpc-addr 0.0.0.0:6000 --http-addr 127.0.0.1:6080")


@pytest.mark.slow
def test_later_starts_say_how_to_make_a_key_and_a_taken_port_says_what_to_do(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    first = ServerProcess(db, tmp_path / "first.log", forked=True)
    key = first.bootstrap_key()
    assert key and first.terminate() == 0
    assert "evalsvc keys create" not in (tmp_path / "first.log").read_text()

    again = ServerProcess(db, tmp_path / "again.log", forked=True)
    try:
        log = (tmp_path / "again.log").read_text()
        assert again.bootstrap_key() is None
        assert f"`evalsvc keys create --tenant default --db '{db}'` makes another" in log
    finally:
        assert again.terminate() == 0

    # No key minted (--bootstrap-key false) and none made: the hint must not speak of a printed key.
    keyless = ServerProcess(f"{db}-keyless", tmp_path / "keyless.log", "--bootstrap-key", "false", forked=True)
    try:
        log = (tmp_path / "keyless.log").read_text()
        assert f"there is no API key yet; `evalsvc keys create --tenant default --db '{db}-keyless'` makes one" in log
        assert "still works" not in log
    finally:
        assert keyless.terminate() == 0
    # A key made with `evalsvc keys create`: no start ever printed one, so no hint may say one did.
    made = evalsvc_run(["keys", "create", "--tenant", "default", "--db", f"{db}-keyless"], os.environ)
    assert made.returncode == 0, made.stderr
    later = ServerProcess(f"{db}-keyless", tmp_path / "later.log", "--bootstrap-key", "false", forked=True)
    try:
        assert later.bootstrap_key() is None
        log = (tmp_path / "later.log").read_text()
        assert f"`evalsvc keys create --tenant default --db '{db}-keyless'` makes another" in log
        assert "printed at the first start" not in log
    finally:
        assert later.terminate() == 0

    def serve(*flags: str, database: str = db) -> subprocess.CompletedProcess[str]:
        return evalsvc_run(["serve", "--db", database, *flags], os.environ)

    with socket.socket() as other_program:  # a plain listener: no SO_REUSEPORT to share the port with
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        address = f"127.0.0.1:{other_program.getsockname()[1]}"
        grpc_taken = serve("--grpc-addr", address)
        # The gateway's port taken: nothing started, and no key minted that nobody would see (the next
        # start mints and shows it; tests/test_startup.py).
        http_taken = serve("--grpc-addr", "127.0.0.1:0", "--http-addr", address, database=f"{db}-fresh")
    for taken in (grpc_taken, http_taken):
        assert taken.returncode == 1 and "Traceback" not in taken.stderr, taken.stderr
        assert "make run GRPC_ADDR=HOST:PORT HTTP_ADDR=HOST:PORT" in taken.stderr
    assert f"cannot listen for gRPC on {address} (--grpc-addr / EVALSVC_GRPC_ADDR): Address already in use" in (
        grpc_taken.stderr
    )
    assert f"cannot listen for HTTP on {address} (--http-addr / EVALSVC_HTTP_ADDR): Address already in use" in (
        http_taken.stderr
    )
    assert http_taken.stdout == ""


async def test_a_missing_key_is_told_how_to_get_one(server) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListRuns(pb.ListRunsRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # In the server's database: a key made without its --db went into another directory's new evalsvc.db.
    assert "`evalsvc keys create --tenant NAME --db URL` makes another in this server's database" in (
        refused.value.details() or ""
    )


def test_sdk_errors_carry_a_hint() -> None:
    from evalsvc_client import EvalClient, RetryPolicy, UnavailableError

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        with EvalClient(address, retry=RetryPolicy(max_attempts=1)) as client, pytest.raises(UnavailableError) as down:
            client.get_run("run_x")
    assert down.value.hint.startswith(f"Nothing answers at {address}: is the server running? `make run`")
    assert down.value.hint in str(down.value)


def test_docs_refer_only_to_what_the_repository_has() -> None:
    """Every relative link of the docs resolves inside the repository, and none cites a file beside it."""
    pages = [ROOT / "README.md", ROOT / "clients" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/reference" not in text, f"{page} cites files outside the repository"
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page}: broken link {target}"
