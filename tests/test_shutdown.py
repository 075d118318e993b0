"""Shutting down a real `evalsvc serve`: gRPC takes no new call from the signal on, and a shutdown the
database holds up (a SQLite file another process keeps locked) ends within --grace-s + 10 s, or at once
at a second signal, with exit code 1 and one WARNING line saying why."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.server import SHUTDOWN_MARGIN_S
from tests.procs import ServerProcess, start_server


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another process's view: a connection holding the file's write lock until closed."""
    locker = sqlite3.connect(path, isolation_level=None, timeout=30)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


async def shutting_down(server: ServerProcess) -> None:
    """SIGTERM, and wait until the server says it is shutting down."""
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "signal received; shutting down" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, server.log_path.read_text()
        await asyncio.sleep(0.05)  # polling a log file: there is no event to await across processes


async def test_a_shutdown_the_database_holds_up_ends_within_its_bound_and_takes_no_new_call(tmp_path: Path) -> None:
    """Before: with the file locked, SIGTERM took minutes (each of the shutdown's writes waited out the
    30 s busy timeout), and gRPC took and ran new calls all the while."""
    database = tmp_path / "evalsvc.db"
    server = await start_server(f"sqlite+aiosqlite:///{database}", tmp_path / "s.log", "--grace-s", "0")
    locker = hold_write_lock(database)
    try:
        started = time.monotonic()
        await shutting_down(server)
        async with grpc.aio.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # not answered: no new call is taken
        code = await asyncio.to_thread(server.wait, 120)
        took = time.monotonic() - started
    finally:
        locker.close()
    log = server.log_path.read_text()
    assert code == 1, log
    assert f"the shutdown took longer than {SHUTDOWN_MARGIN_S:g} s (--grace-s + {SHUTDOWN_MARGIN_S:g} s)" in log
    assert "exiting now without finishing the shutdown" in log and "Traceback" not in log
    assert took < SHUTDOWN_MARGIN_S + 20, f"the shutdown took {took:.1f} s"


async def test_a_second_signal_ends_a_held_up_shutdown_at_once(tmp_path: Path) -> None:
    database = tmp_path / "evalsvc.db"
    server = await start_server(f"sqlite+aiosqlite:///{database}", tmp_path / "s.log", "--grace-s", "0")
    locker = hold_write_lock(database)
    try:
        await shutting_down(server)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(server.wait, 60)
        took = time.monotonic() - started
    finally:
        locker.close()
    log = server.log_path.read_text()
    assert code == 1 and "a second signal arrived: exiting now" in log, log
    assert took < SHUTDOWN_MARGIN_S / 2, f"the second signal took {took:.1f} s to end the process"
