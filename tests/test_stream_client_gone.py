"""A watcher that stops reading and then disconnects ends its streams quietly and frees its slots.

Such a client grants no flow-control window, so the server's write of the next event waits; when
the connection closes, grpc's core fails that write. grpc.aio, which wrote the messages an async
generator yielded, logged the failure as `ExecuteBatchError raised in core by servicer method` with
a traceback at ERROR whenever it saw it before the client's close (once per connection in the report
that found it: a client's doing, logged as a server fault), and the handler's generator, abandoned,
released its watch slot only when it was collected. The interceptor now writes each message itself.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests import http2
from tests.conftest import make_settings
from tests.helpers import create_request, keyed_channel

CAP = 4  # the tenant's watch streams (--max-watch-streams)
WITHIN_S = 20.0  # generous on a loaded machine; each step takes milliseconds


async def until(condition: str, check: object) -> None:
    """Wait (bounded) until `check()` is true: the server notices a closed connection asynchronously."""
    async with asyncio.timeout(WITHIN_S):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)
    assert check(), condition  # type: ignore[operator]


async def test_a_watcher_that_stops_reading_and_disconnects_ends_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = EvalServer(make_settings(tmp_path, workers=0, max_watch_streams=CAP))
    await srv.start()
    assert srv.bootstrap_key
    caplog.set_level(logging.DEBUG)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(1), timeout=30)).run.id  # stays PENDING: no workers

            for _round in range(3):  # the race grpc lost was not every time: a few rounds
                # CAP watches on one connection that grants no window: each first event's write waits.
                _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                writer.write(http2.opening(initial_window=0))
                request = pb.WatchRunRequest(run_id=run_id)
                key = {"authorization": f"Bearer {srv.bootstrap_key}"}
                for stream_id in range(1, 2 * CAP, 2):
                    writer.write(http2.grpc_call(stream_id, "/evalsvc.v1.EvalRunService/WatchRun", request, key))
                await writer.drain()
                await until("the watches are open", lambda: srv.bus.watcher_count() == CAP)
                writer.close()  # and disconnects without having read a byte
                await until("the watches ended", lambda: srv.bus.watcher_count() == 0)

                # Its slots are free: the tenant opens CAP watches again, each with its first event.
                watches = [stub.WatchRun(request, timeout=30) for _ in range(CAP)]
                firsts = await asyncio.gather(*(watch.read() for watch in watches))
                assert [first.WhichOneof("event") for first in firsts] == ["run"] * CAP
                for watch in watches:
                    watch.cancel()
                await until("the tenant's watches ended", lambda: srv.bus.watcher_count() == 0)
    finally:
        await srv.stop(grace=0.5)

    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [f"{r.name} {r.levelname} {r.getMessage()}" for r in loud]
    codes = [r.code for r in caplog.records if getattr(r, "method", "").endswith("/WatchRun")]
    assert codes.count("CANCELLED") == 3 * 2 * CAP, codes  # the stalled watches and the tenant's
