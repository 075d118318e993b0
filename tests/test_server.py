"""Server plumbing: health per service, reflection, configuration, and SIGTERM shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from evalsvc import config
from evalsvc.cli import build_parser
from evalsvc.server import SERVICE_NAMES
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests.dbs import USE_POSTGRES, db_url
from tests.helpers import create_request, keyed_channel, watch_all
from tests.procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("service", ["", *SERVICE_NAMES])
async def test_health_reports_serving_per_service(channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
        assert set(SERVICE_NAMES) <= names
        break


def test_flags_override_environment_which_overrides_defaults() -> None:
    args = build_parser().parse_args(["serve", "--workers", "7"])
    settings = config.from_args(args, {"EVALSVC_WORKERS": "3", "EVALSVC_GRPC_ADDR": "127.0.0.1:6000"})
    assert settings.workers == 7
    assert settings.grpc_addr == "127.0.0.1:6000"
    assert settings.db == "sqlite+aiosqlite:///./evalsvc.db"
    assert config.Settings.from_env({"EVALSVC_HEARTBEAT_S": "2.5"}).heartbeat_s == 2.5


def test_every_numeric_setting_has_a_minimum_and_values_below_it_are_refused_by_name() -> None:
    numeric = {f.name for f in dataclasses.fields(config.Settings) if str(f.type) in {"int", "float"}}
    assert set(config.MINIMUMS) == numeric
    assert config.Settings(workers=0, tenant_budget_usd=0.0).workers == 0  # zero where it means something
    with pytest.raises(config.SettingsError, match=r"--claim-batch \(EVALSVC_CLAIM_BATCH\) must be at least 1, not 0"):
        config.Settings(claim_batch=0)
    with pytest.raises(config.SettingsError, match=r"--lease-ttl-s \(EVALSVC_LEASE_TTL_S\) must be more than 0"):
        config.Settings.from_env({"EVALSVC_LEASE_TTL_S": "0"})
    with pytest.raises(config.SettingsError, match="EVALSVC_WORKERS: 'many' is not a whole number"):
        config.Settings.from_env({"EVALSVC_WORKERS": "many"})
    # A switch takes its words only: `maybe` was read as false, and a first start minted no key.
    assert config.Settings.from_env({"EVALSVC_BOOTSTRAP_KEY": "Off"}).bootstrap_key is False
    # NaN passes every comparison (a NaN lease was stored as NULL and never expired); an empty variable
    # of a number or a switch is unset (a compose file's `EVALSVC_BOOTSTRAP_KEY=`), of text it is empty.
    with pytest.raises(config.SettingsError, match=r"--lease-ttl-s \(EVALSVC_LEASE_TTL_S\) must be a finite number"):
        config.Settings.from_env({"EVALSVC_LEASE_TTL_S": "nan"})
    with pytest.raises(config.SettingsError, match=r"--log-level \(EVALSVC_LOG_LEVEL\) must be one of DEBUG, INFO"):
        config.Settings(log_level="LOUD")
    assert config.Settings(log_level="debug").log_level == "debug"
    blank = config.Settings.from_env(
        {"EVALSVC_BOOTSTRAP_KEY": "", "EVALSVC_WORKERS": " ", "EVALSVC_HTTP_ADDR": "", "EVALSVC_SQLITE_SYNCHRONOUS": ""}
    )
    assert (blank.bootstrap_key, blank.workers, blank.http_addr) == (True, 64, "")
    assert blank.sqlite_synchronous == "FULL"  # a setting of a few words has no empty one: unset
    with pytest.raises(config.SettingsError, match="EVALSVC_BOOTSTRAP_KEY: 'maybe' is not one of 1, on, true, yes"):
        config.Settings.from_env({"EVALSVC_BOOTSTRAP_KEY": "maybe"})


def test_a_reply_from_an_endpoint_always_fits_in_a_result_that_can_be_read_back() -> None:
    """--max-reply-bytes (4 MiB) stood alone: with --max-message-bytes at 1 MiB a target's 2 MB answer was
    recorded, and every ListRunResults of that run then failed RESOURCE_EXHAUSTED for good. The reply
    bound is now a quarter of the message bound unless set lower; a larger one, or a message bound
    under 256 KiB (what a run echoes must fit in its CreateRun answer), is refused naming both."""
    assert config.Settings().reply_bytes == 4 * 1024 * 1024
    assert config.Settings(max_message_bytes=1 << 20).reply_bytes == 256 * 1024
    assert config.Settings(max_message_bytes=1 << 20, max_reply_bytes=4096).reply_bytes == 4096
    both = r"--max-reply-bytes \(EVALSVC_MAX_REPLY_BYTES\) must be 0 or from 1024 to a quarter of --max-message-bytes"
    with pytest.raises(config.SettingsError, match=both + r".* \(262144\).*, not 4194304$"):
        config.Settings(max_message_bytes=1 << 20, max_reply_bytes=4 << 20)
    with pytest.raises(config.SettingsError, match=both):
        config.Settings(max_reply_bytes=512)
    with pytest.raises(
        config.SettingsError, match=r"--max-message-bytes .* must be from 262144 to 2147483647, not 1024"
    ):
        config.Settings(max_message_bytes=1024)


def test_one_tenants_jobs_take_at_most_their_share_of_the_workers() -> None:
    """--max-workers-per-tenant: by default half of --workers (at least 1), never more than --workers."""
    assert config.Settings().workers_per_tenant == 32 and config.Settings(workers=1).workers_per_tenant == 1
    assert config.Settings(workers=8, max_workers_per_tenant=8).workers_per_tenant == 8
    # An API-only replica's calls are dataset generation's: one at a time per tenant slowed them (review).
    assert config.Settings(workers=0).workers_per_tenant == 32
    assert config.Settings(workers=0, max_workers_per_tenant=4).workers_per_tenant == 4
    with pytest.raises(config.SettingsError, match=r"--max-workers-per-tenant .* must be at most --workers .*\(8\)"):
        config.Settings(workers=8, max_workers_per_tenant=9)


def test_one_tenants_rest_streams_cannot_take_every_rest_connection() -> None:
    """The share of the gateway's connections one tenant's streams may hold is at most half of them
    (by default a quarter): with the share the whole (2000 of 2000 was the default watch quota), one
    tenant's watches left every other tenant 503s. A setting that allows it is refused naming both."""
    assert config.Settings().http_streams_per_tenant == 500  # a quarter of the default 2000
    assert config.Settings(max_http_connections=20).http_streams_per_tenant == 5  # follows the connections
    assert config.Settings(max_http_connections=2).http_streams_per_tenant == 1
    assert config.Settings(max_http_connections=20, max_http_streams_per_tenant=10).http_streams_per_tenant == 10
    both = r"--max-http-streams-per-tenant \(EVALSVC_MAX_HTTP_STREAMS_PER_TENANT\) must be at most half of "
    both += r"--max-http-connections \(EVALSVC_MAX_HTTP_CONNECTIONS\).*: 11 is more than 10$"
    with pytest.raises(config.SettingsError, match=both):
        config.Settings(max_http_connections=20, max_http_streams_per_tenant=11)
    with pytest.raises(config.SettingsError, match="2000 is more than 1000"):
        config.Settings.from_env({"EVALSVC_MAX_HTTP_STREAMS_PER_TENANT": "2000"})
    with pytest.raises(config.SettingsError, match=r"--max-http-connections .* must be at least 2, not 1"):
        config.Settings(max_http_connections=1)  # one connection cannot be shared
    # The standalone gateway takes both flags.
    args = build_parser().parse_args(["gateway", "--grpc-target", "x:1", "--max-http-streams-per-tenant", "7"])
    assert config.from_args(args, {}).http_streams_per_tenant == 7


def test_readme_documents_every_setting_as_the_settings_say() -> None:
    """Each setting's row as scripts/readme_config.py writes it: a row edited by hand, or a help text
    changed without it, drifted apart (the README said one thing, `--help` another)."""
    readme = (ROOT / "README.md").read_text()
    for flag, env, default, text in config.describe():
        assert f"| `{flag}` | `{env}` | `{default}` | {text} |" in readme, f"rerun scripts/readme_config.py: {flag}"


def test_the_docs_quote_what_evalsvc_says() -> None:
    """The quick start's exact-match line, the newest migration in the exit codes' example, and a grpcurl
    call that sends the key the service asks for (they said "output equals the expected output", 0010,
    and no key)."""
    from evalsvc.graders.builtin import _ExactMatch
    from evalsvc.store import migrate

    readme = (ROOT / "README.md").read_text()
    assert f"RESULT_STATE_PASSED - {_ExactMatch._PASS.explanation}\n" in readme
    assert f"(its newest is {migrate.head()})" in (ROOT / "docs" / "operations.md").read_text()
    calls = [line for line in readme.splitlines() if "grpcurl -plaintext -" in line and "WatchRun" in line]
    assert calls and all('-H "authorization: Bearer $EVALSVC_API_KEY"' in line for line in calls)


async def test_sigterm_drains_and_a_restart_finds_the_runs(tmp_path: Path) -> None:
    db = db_url(tmp_path, "svc.db")
    server = ServerProcess(db, tmp_path / "a.log")
    key = server.bootstrap_key()
    assert key
    try:
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(3))).run.id
            await watch_all(stub, run_id)
    finally:
        assert server.terminate() == 0
    log = server.log_path.read_text()
    assert "listening on 127.0.0.1:" in log and "evalsvc stopped" in log
    await assert_finds_run(db, tmp_path / "b.log", key, run_id)


async def test_readme_quickstart_runs_against_a_live_server(server) -> None:
    import asyncio
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "quickstart.py"),
        f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "EVALSVC_API_KEY": server.bootstrap_key},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "RUN_STATUS_SUCCEEDED (4/4)" in text and "pass rate 75%, overall passed: True" in text


@pytest.mark.skipif(USE_POSTGRES, reason="evalsvc backup copies a SQLite file (PostgreSQL: pg_dump)")
async def test_a_backup_taken_while_the_server_runs_holds_its_runs(tmp_path: Path) -> None:
    """A copy of a running server's file was an empty database (its commits were in the -wal), and nothing
    said how to take one; `evalsvc backup` uses SQLite's online backup API, and a server started on the
    copy finds the run."""
    db = db_url(tmp_path, "svc.db")
    server = ServerProcess(db, tmp_path / "a.log")
    key = server.bootstrap_key()
    try:
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(3))).run.id
            await watch_all(stub, run_id)
        copy = tmp_path / "backup" / "copy.db"
        copy.parent.mkdir()
        command = [sys.executable, "-m", "evalsvc", "backup", "--db", db, str(copy)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
    finally:
        assert server.terminate() == 0
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]  # one file, no -wal to carry along
    assert copy.stat().st_mode & 0o077 == 0, oct(copy.stat().st_mode)  # key hashes and secrets: the owner's only
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("SELECT id FROM runs").fetchall() == [(run_id,)]
    await assert_finds_run(f"sqlite+aiosqlite:///{copy}", tmp_path / "b.log", key, run_id)


async def assert_finds_run(db: str, log: Path, key: str, run_id: str) -> None:
    """A server started on `db` serves the 3-item run `run_id`, completed, then stops cleanly."""
    server = ServerProcess(db, log)
    try:
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            assert run.counts.completed_evaluations == 3
    finally:
        assert server.terminate() == 0


def test_settings_that_become_grpc_channel_arguments_fit_a_c_int() -> None:
    """`--max-message-bytes 99999999999` passed its minimum and crashed the start with an OverflowError
    (grpc's channel arguments are C ints), after the database was migrated. At its maximum a server is made."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from evalsvc.server import server_options

    at_most = {name: int(config.MAXIMUMS[name]) for name in config.MAXIMUMS}
    channel_arguments = ("max_message_bytes", "max_concurrent_streams", "max_connections")
    assert {name: at_most[name] for name in channel_arguments} == dict.fromkeys(channel_arguments, 2**31 - 1)
    assert at_most["connection_idle_s"] * 1000 <= 2**31 - 1  # grpc.max_connection_idle_ms
    with ThreadPoolExecutor(1) as pool:  # every setting at its maximum at once
        grpc.server(pool, options=server_options(config.Settings(**at_most))).stop(None)
    for name, maximum in at_most.items():
        with pytest.raises(config.SettingsError, match=f"(from .* to|at most) {maximum}, not {maximum + 1}$"):
            config.Settings(**{name: maximum + 1})
