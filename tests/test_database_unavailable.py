"""A database that cannot serve (a full disk, an unreachable PostgreSQL) is UNAVAILABLE with
RetryInfo and reason DATABASE_UNAVAILABLE, never INTERNAL; nothing is logged at error level, and
the service recovers by itself once the database can serve again (docs/errors.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.execution import executor as executor_module
from evalsvc.server import EvalServer
from evalsvc.store import runs as run_store
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests import dbs
from tests.conftest import make_settings
from tests.helpers import all_results, create_request, error_reason, fill, keyed_channel, retry_delay, tmpfs, watch_all


def assert_unavailable(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error_reason(error) == "DATABASE_UNAVAILABLE"
    assert (retry_delay(error) or 0) > 0


async def test_a_full_disk_is_unavailable_with_retry_info_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        srv = EvalServer(make_settings(tmp_path, db=f"sqlite+aiosqlite:///{disk / 'evalsvc.db'}"))
        await srv.start()
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                await runs.CreateRun(create_request(1))
                filler = fill(disk)
                caplog.set_level(logging.WARNING)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await runs.CreateRun(create_request(200))
                assert_unavailable(err.value)
                assert not [r for r in caplog.records if r.exc_info]  # one line each, no traceback
                assert any("disk is full" in r.getMessage() for r in caplog.records)
                filler.unlink()
                recovered = await runs.CreateRun(create_request(1))
                assert (await runs.GetRun(pb.GetRunRequest(run_id=recovered.run.id))).run.id == recovered.run.id
        finally:
            await srv.stop(grace=0.5)


async def run_to_its_end(tmp_path: Path, items: int) -> tuple[list[Any], list[Any]]:
    """On a server of its own, a run of `items` items watched to its end (within 30 s): its events and
    its results."""
    srv = EvalServer(make_settings(tmp_path))
    await srv.start()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            created = await runs.CreateRun(create_request(items))
            events = await asyncio.wait_for(watch_all(runs, created.run.id), 30)
            return events, await all_results(runs, created.run.id)
    finally:
        await srv.stop(grace=0.5)


async def test_results_recorded_while_postgres_is_out_of_connections_are_stored_once_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's TooManyConnectionsError (53300) reaches SQLAlchemy as a plain DBAPIError: the recorder
    took it for the data's fault, split the batch and stored every correct result as ERROR
    RESULT_NOT_STORABLE for good. The batch waits for the database instead (injected on either engine)."""
    refusals = 3
    insert_results = run_store.insert_results

    async def out_of_connections(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        nonlocal refusals
        if refusals > 0:
            refusals -= 1
            raise sa_exc.DBAPIError(
                "INSERT INTO results ...",
                {},
                asyncpg.exceptions.TooManyConnectionsError('too many connections for database "evalsvc"'),
            )
        await insert_results(conn, rows)

    monkeypatch.setattr(run_store, "insert_results", out_of_connections)
    caplog.set_level(logging.WARNING)
    events, results = await run_to_its_end(tmp_path, 6)
    assert refusals == 0
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert (events[-1].counts.passed, events[-1].counts.errored) == (6, 0)
    assert [r.state for r in results] == [run_pb2.RESULT_STATE_PASSED] * 6
    assert any("out of resources" in r.getMessage() for r in caplog.records)  # said in one line
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("evalsvc")]


async def test_a_watcher_sees_what_a_failed_recording_had_committed_before_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a batch split by the recorder may commit a part and then fail (the database became
    unavailable for the rest); the committed part's events were never handed to the watchers here, and a
    watcher of a run that ended in that part waited for good. Here the whole recording commits and then
    fails: the watcher reads the log and sees the run end."""
    record = executor_module.record
    failed = False

    async def committed_then_failed(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        recorded = await record(*args, **kwargs)
        if not failed:
            failed = True  # what was committed stays; its events are lost with the failure
            raise sa_exc.DBAPIError("INSERT ...", {}, asyncpg.exceptions.TooManyConnectionsError("too many"))
        return recorded

    monkeypatch.setattr(executor_module, "record", committed_then_failed)
    events, _ = await run_to_its_end(tmp_path, 3)
    assert failed and events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED


class Relay:
    """A TCP relay to PostgreSQL that the test can cut: the database becomes unreachable for the
    server (connections drop, new ones are refused) without touching the shared PostgreSQL."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._pipes):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._pipes.update((writer, up_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._pipes.difference_update((writer, up_writer))


@contextlib.asynccontextmanager
async def relayed(url: str) -> AsyncIterator[tuple[str, Relay]]:
    parsed = make_url(url)
    relay = Relay((parsed.host or "127.0.0.1", parsed.port or 5432))
    await relay.start()
    try:
        yield parsed.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False), relay
    finally:
        with contextlib.suppress(Exception):
            await relay.cut()


@pytest.mark.skipif(not dbs.USE_POSTGRES, reason="PostgreSQL only: run with EVALSVC_TEST_DB=postgres")
async def test_an_unreachable_postgres_is_unavailable_with_retry_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with relayed(dbs.db_url(tmp_path)) as (url, relay):
        srv = EvalServer(make_settings(tmp_path, db=url, auth_cache_s=60.0))
        await srv.start()
        try:
            async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                created = await runs.CreateRun(create_request(1))
                await relay.cut()
                caplog.set_level(logging.WARNING)
                for call in (
                    runs.GetRun(pb.GetRunRequest(run_id=created.run.id + "x")),
                    runs.CreateRun(create_request(1)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert_unavailable(err.value)
        finally:
            await srv.stop(grace=0.5)
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("evalsvc")]


async def terminate_backends(url: str) -> int:
    """pg_terminate_backend every client connection to the database `url` (as a restart or failover
    would drop them), from a connection of its own, waiting until each is gone. How many it ended (one
    that ended by itself meanwhile does not count)."""
    conn = await asyncpg.connect(dbs.ADMIN_URL, timeout=5)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                " WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                make_url(url).database,
            )
        )
    finally:
        await conn.close()


@pytest.mark.skipif(not dbs.USE_POSTGRES, reason="PostgreSQL only: run with EVALSVC_TEST_DB=postgres")
async def test_connections_killed_under_the_pool_cost_a_reconnect_never_internal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend (what a restart or failover does to the pool) left dead connections in the
    pool: the next calls that drew one got INTERNAL ("connection is closed") and the log a traceback.
    A dead pooled connection is found at checkout now, and an error on a connection lost mid-call is
    UNAVAILABLE with RetryInfo."""
    url = dbs.db_url(tmp_path)
    srv = EvalServer(make_settings(tmp_path, db=url))
    await srv.start()
    caplog.set_level(logging.WARNING)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            created = await runs.CreateRun(create_request(3))
            await watch_all(runs, created.run.id)
            calls = (
                lambda: runs.GetRun(pb.GetRunRequest(run_id=created.run.id)),
                lambda: runs.ListRuns(pb.ListRunsRequest()),
                lambda: runs.CreateRun(create_request(2)),
                lambda: watch_all(runs, created.run.id),
            )
            for _ in range(3):
                # Calls side by side, so the pool holds several connections when they are killed.
                await asyncio.gather(*(call() for call in calls for _ in range(3)))
                assert await terminate_backends(url) > 0
                answers = await asyncio.gather(*(call() for call in calls for _ in range(3)), return_exceptions=True)
                for answer in answers:
                    if isinstance(answer, grpc.aio.AioRpcError):
                        assert_unavailable(answer)
                    else:
                        assert not isinstance(answer, BaseException), answer
            # And the service works on: a run created now ends, its results all there.
            after = await runs.CreateRun(create_request(4))
            events = await watch_all(runs, after.run.id)
            assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
            assert events[-1].counts.passed == 4
    finally:
        await srv.stop(grace=0.5)
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("evalsvc")]


async def test_a_sqlite_database_removed_while_serving_turns_not_serving_and_takes_no_more_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe removed the database's directory mid-run: the server went on SERVING and acknowledging
    writes into a deleted file (all gone at its exit), and a second server started on the recreated
    directory beside it. Now the watchdog finds the files gone: health NOT_SERVING (an orchestrator
    restarts it), one ERROR line naming the file, and every write UNAVAILABLE, never acknowledged."""
    directory = tmp_path / "data"
    directory.mkdir()
    srv = EvalServer(make_settings(tmp_path, db=f"sqlite+aiosqlite:///{directory / 'evalsvc.db'}", stall_s=0.4))
    claim_stopped = asyncio.Event()
    seen = _Seen("loop claim stops until shutdown", claim_stopped, asyncio.get_running_loop())
    logging.getLogger("evalsvc.liveness").addHandler(seen)
    await srv.start()
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            await runs.CreateRun(create_request(1))
            caplog.set_level(logging.WARNING)
            shutil.rmtree(directory)
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            async with asyncio.timeout(30):  # the watchdog looks every 0.1 s here
                async for status in health:
                    if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
            health.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await runs.CreateRun(create_request(1))
            assert_unavailable(err.value)  # the cause is the operator's: said in the log, not to tenants
            # The claim loop (polling every 0.2 s) stops until shutdown, in one WARNING, rather than log an
            # ERROR at every retry until then.
            async with asyncio.timeout(30):
                await claim_stopped.wait()
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and str(directory) in errors[0].getMessage() and not errors[0].exc_info
            assert "is lost" in errors[0].getMessage()
    finally:
        logging.getLogger("evalsvc.liveness").removeHandler(seen)
        await srv.stop(grace=0.5)


class _Seen(logging.Handler):
    """Sets `seen` (on `loop`) when a record saying `words` is logged: a log line to await, not poll for."""

    def __init__(self, words: str, seen: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.words, self.seen, self.loop = words, seen, loop

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.loop.call_soon_threadsafe(self.seen.set)
