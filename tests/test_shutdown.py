"""Shutting down a real `evalsvc serve`: gRPC and REST take no new call from the signal on, and a shutdown the
database holds up (a SQLite file another process keeps locked) ends within --grace-s + 10 s, or at once
at a second signal, with exit code 1 and one WARNING line saying why."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.execution.executor import Executor
from evalsvc.server import SHUTDOWN_MARGIN_S, EvalServer
from evalsvc.v1 import dataset_generation_pb2_grpc, dataset_service_pb2_grpc, item_pb2
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1.dataset_generation_pb2 import ContinueConversationsRequest, Conversation
from tests import dbs
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, chat_reply
from tests.helpers import keyed_channel
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
    assert "exiting now; jobs still leased" in log and "Traceback" not in log
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


async def test_a_signal_after_the_shutdown_completed_leaves_the_exit_code_0(tmp_path: Path) -> None:
    """Closing the event loop gave SIGTERM its default action back, so a second signal during the
    interpreter's teardown (`timeout` signals the child and its group) killed a process whose graceful
    shutdown was complete: exit 143, and no WARNING saying why."""
    server = await start_server(f"sqlite+aiosqlite:///{tmp_path / 'evalsvc.db'}", tmp_path / "s.log")
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "evalsvc stopped" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline and server.proc.poll() is None, server.log_path.read_text()
        await asyncio.sleep(0.005)  # polling a log file: there is no event to await across processes
    server.proc.send_signal(signal.SIGTERM)  # while the process tears itself down
    assert await asyncio.to_thread(server.wait, 30) == 0, server.log_path.read_text()


async def test_the_rest_gateway_takes_no_new_call_once_the_shutdown_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only gRPC stopped taking calls at once: the embedded gateway calls the services in process, so a
    REST CreateRun was taken and ran while the executor's last writes waited on the database."""
    executor_may_stop = asyncio.Event()
    stop_executor = Executor.stop

    async def held_stop(self: Executor) -> None:  # as if its last writes waited on a locked database
        await executor_may_stop.wait()
        await stop_executor(self)

    monkeypatch.setattr(Executor, "stop", held_stop)
    srv = EvalServer(make_settings(tmp_path, http_addr="127.0.0.1:0"))
    await srv.start()
    assert srv.gateway is not None
    url = f"http://127.0.0.1:{srv.gateway.port}/v1/runs"
    headers = {"authorization": f"Bearer {srv.bootstrap_key}"}
    stopping = asyncio.create_task(srv.stop(grace=0.5))
    try:
        deadline = time.monotonic() + 10
        while True:  # the gateway notices within a tick of its own loop (uvicorn offers no event)
            try:
                async with httpx.AsyncClient() as client:
                    await client.get(url, headers=headers)
            except httpx.TransportError:
                break  # refused: no new call is taken
            assert time.monotonic() < deadline, "the gateway still took calls 10 s into the shutdown"
            await asyncio.sleep(0.05)
        assert not stopping.done()  # while the executor's stop is still held up
    finally:
        executor_may_stop.set()
        await stopping


async def test_a_signal_ends_a_start_that_hangs(tmp_path: Path) -> None:
    """Review: the handlers were installed before the start only to set the stop event, so a start that
    hangs (here on a SQLite file another process keeps locked; a migration lock on PostgreSQL) ignored
    SIGTERM and Ctrl-C until its own timeout. A signal during the start ends the process at once."""
    database = tmp_path / "evalsvc.db"
    sqlite3.connect(database).close()
    locker = hold_write_lock(database)
    log_path = tmp_path / "s.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "evalsvc",
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--db",
                f"sqlite+aiosqlite:///{database}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "evalsvc starting" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            await asyncio.sleep(0.05)  # polling a log file: there is no event to await across processes
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        locker.close()
    log = log_path.read_text()
    assert code == 1 and "a signal arrived during the start: exiting now" in log, log
    assert took < SHUTDOWN_MARGIN_S / 2, f"the start took {took:.1f} s to end"


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` installed (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_before_the_servers_handlers_ends_the_start_in_one_line(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The server's handlers come after its imports (a second): a SIGTERM before them killed the process
    with nothing said (exit 143) and Ctrl-C printed a KeyboardInterrupt traceback (an operator probe).
    `evalsvc serve` handles both from its first step: one line, exit 1, as a signal during the start."""
    log_path = tmp_path / "s.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evalsvc", "serve", "--grpc-addr", "127.0.0.1:0", "--db", dbs.db_url(tmp_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not _catches(proc.pid, signal.SIGTERM):  # Python catches SIGINT from its start, not SIGTERM
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            await asyncio.sleep(0.005)  # polling /proc: there is no event to await across processes
        proc.send_signal(sig)
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert code == 1 and "Traceback" not in log, log
    assert f"{sig.name} arrived during the start: exiting now" in log and "evalsvc starting" not in log, log


async def test_an_open_health_watch_ends_with_not_serving_and_does_not_hold_the_shutdown(tmp_path: Path) -> None:
    """A health Watch (a load balancer's, gRPC client-side health checking's) got NOT_SERVING at once but
    stayed open, so every SIGTERM of an idle server waited out the whole --grace-s (10 s by default)."""
    srv = EvalServer(make_settings(tmp_path, grace_s=30.0))
    port = await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # Two: a connection may hold two keyless streams (evalsvc.api.health.PER_CONNECTION).
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=service)) for service in ("", "no.such.Service")]
        firsts = [await asyncio.wait_for(watch.read(), 5) for watch in watches]
        assert [first.status for first in firsts] == [  # type: ignore[union-attr]
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
        ]
        started = time.monotonic()
        stopping = asyncio.create_task(srv.stop())  # the settings' grace: 30 s
        try:
            rest = [await asyncio.wait_for(_statuses(watch), 10) for watch in watches]  # each to its end
        finally:
            await stopping
        took = time.monotonic() - started
    assert rest == [[health_pb2.HealthCheckResponse.NOT_SERVING], []]
    assert [await watch.code() for watch in watches] == [grpc.StatusCode.OK] * 2
    assert took < 5, f"the stop took {took:.1f} s with health watches open"


async def _statuses(watch: grpc.aio.UnaryStreamCall) -> list[int]:  # type: ignore[type-arg]
    """The statuses a health Watch sends until it ends."""
    statuses = []
    while (reply := await watch.read()) is not grpc.aio.EOF:
        statuses.append(reply.status)
    return statuses


async def test_a_health_watch_opened_as_the_shutdown_begins_never_ends_on_serving() -> None:
    """grpc_health marks the shutdown before it sets each service NOT_SERVING: a Watch that came in
    between wrote the still-SERVING status and ended there (a review). It says NOT_SERVING."""
    from evalsvc.api.health import BoundedHealthServicer, KeylessStreams

    servicer = BoundedHealthServicer(KeylessStreams(10))
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer._gracefully_shutting_down = True  # the window: marked, not yet set

    class Context:
        def __init__(self) -> None:
            self.written: list[int] = []

        async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
            self.written.append(reply.status)

    context = Context()
    await asyncio.wait_for(servicer._watch("", context), 5)
    assert context.written == [health_pb2.HealthCheckResponse.NOT_SERVING]


async def test_a_shutdown_during_continue_conversations_ends_them_quietly_within_its_bound(tmp_path: Path) -> None:
    """The probe: ContinueConversations went on detached once its callers had gone, so at SIGTERM hundreds
    of them met the closed HTTP client (598 ERROR tracebacks "Cannot send a request, as the client has been
    closed") and the process exited 38 s after a signal that said "at most 20 s in all". Now abandoned calls
    have ended with their callers (so the tenant's next two are taken: CONTINUES_PER_TENANT), the calls in
    flight at the signal end CANCELLED or UNAVAILABLE after --grace-s, and the log has no ERROR."""
    answer = chat_reply(json.dumps({"items": ["next"]}))
    with FakeEndpoint(dataclasses.replace(answer, delay_s=0.1)) as generator:  # a call of 100: 2.5 s at least
        server = await start_server(
            f"sqlite+aiosqlite:///{tmp_path / 'evalsvc.db'}",
            tmp_path / "s.log",
            *("--grace-s", "1", "--outbound-allow", "127.0.0.1"),
            *("--judge-base-url", generator.url + "/v1", "--judge-model", "judge"),
        )
        try:
            async with keyed_channel(server.port, server.bootstrap_key() or "") as channel:
                datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
                dataset_id = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset()))).dataset.id
                generations = dataset_generation_pb2_grpc.DatasetGenerationServiceStub(channel)

                def hundred(prefix: str, timeout: float | None = None) -> Any:
                    turns = [item_pb2.Message(role="user", content="Can I take two?")]
                    conversations = [Conversation(item_id=f"{prefix}-{i}", turns=turns) for i in range(100)]
                    request = ContinueConversationsRequest(dataset_id=dataset_id, conversations=conversations)
                    return generations.ContinueConversations(request, timeout=timeout)

                with pytest.raises(grpc.aio.AioRpcError) as passed:
                    await hundred("abandoned", timeout=1.0)
                assert passed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                seen = len(generator.seen)
                in_flight = [hundred("held")]
                assert await asyncio.to_thread(generator.wait_seen, seen + 1, 30)
                started = time.monotonic()
                await shutting_down(server)
                codes = []
                for call in in_flight:
                    with pytest.raises(grpc.aio.AioRpcError) as ended:
                        await call
                    codes.append(ended.value.code())
            code = await asyncio.to_thread(server.wait, 60)
            took = time.monotonic() - started
        finally:
            if server.proc.poll() is None:
                server.kill()
    log = server.log_path.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log
    assert code == 0, log
    assert took < 1 + SHUTDOWN_MARGIN_S, f"the shutdown took {took:.1f} s"
    assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, codes
