"""What a watcher whose client stops reading may cost the server: a bounded amount of memory.

Measured on a real server process: N streams that never read, over HTTP/2 connections with a 1 KiB
window, watch a run that produces thousands of events. Before the bound, each such stream held about
1.3 MiB (every event of a 1,000-event database page, parsed); now it holds a page of at most 32 KiB
serialized events and its share of the live events. The threshold leaves room for a loaded machine
(RSS moves with allocator arenas and transient buffers) while failing the unbounded behaviour by far.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evalsvc.events.watch import BATCH_BYTES, PAGE_BYTES, Logged
from evalsvc.server import EvalServer
from evalsvc.store import events as event_log
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests.helpers import create_request, keyed_channel, watch_all
from tests.procs import ServerProcess

STALLED_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
STREAMS = 200
MAX_KIB_PER_STALLED_STREAM = 512  # measured ~95-145 KiB (bench/stalled.py); unbounded it was ~1,300 KiB


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


@pytest.mark.slow
async def test_watchers_that_never_read_cost_bounded_memory(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'stalled.db'}", tmp_path / "server.log")
    try:
        key = server.bootstrap_key()
        assert key
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            await watch_all(stub, (await stub.CreateRun(create_request(2000, repetitions=2))).run.id)  # warm-up
            before = rss_kib(server.proc.pid)
            run = (await stub.CreateRun(create_request(2000, repetitions=2))).run
            stalled = [keyed_channel(server.port, key, options=[*STALLED_READER, ("test.conn", i)]) for i in range(2)]
            calls = [
                eval_run_service_pb2_grpc.EvalRunServiceStub(stalled[i % 2]).WatchRun(pb.WatchRunRequest(run_id=run.id))
                if i % 4
                else eval_run_service_pb2_grpc.EvalRunServiceStub(stalled[i % 2]).WatchRunBatched(
                    pb.WatchRunBatchedRequest(run_id=run.id)
                )
                for i in range(STREAMS)
            ]
            for call in calls:
                await call.initial_metadata()  # the server has begun sending; the client reads nothing
            events = await watch_all(stub, run.id)  # the run produces its ~4,000 events past them
            assert len(events) > 4000
            per_stream = (rss_kib(server.proc.pid) - before) / STREAMS
            assert per_stream < MAX_KIB_PER_STALLED_STREAM, f"{per_stream:.0f} KiB per stalled stream"

            for call in calls:
                call.cancel()
            for conn in stalled:
                await conn.close()
            # Closed, they free what they held: a second round reuses it rather than growing again.
            after_first = rss_kib(server.proc.pid)
            again = (await stub.CreateRun(create_request(2000, repetitions=2))).run
            async with keyed_channel(server.port, key, options=STALLED_READER) as conn:
                second = [
                    eval_run_service_pb2_grpc.EvalRunServiceStub(conn).WatchRun(pb.WatchRunRequest(run_id=again.id))
                    for _ in range(STREAMS)
                ]
                for call in second:
                    await call.initial_metadata()
                await watch_all(stub, again.id)
                regrowth = (rss_kib(server.proc.pid) - after_first) / STREAMS
                for call in second:
                    call.cancel()
            assert regrowth < per_stream / 2 + 32, f"{regrowth:.0f} KiB per stream again ({per_stream:.0f} first)"
    finally:
        server.terminate()


async def test_a_database_page_is_bounded_in_bytes_but_never_empty(server: EvalServer, runs) -> None:  # type: ignore[no-untyped-def]
    run = (await runs.CreateRun(create_request(300))).run
    every = [e.SerializeToString() for e in await watch_all(runs, run.id)]
    async with server.db.read() as conn:
        page, more = await event_log.read_page(conn, "default", run.id, 0, 1000, 1 << 20)
        assert page == every and not more  # all of it fits
        budget = 10 * len(every[5])
        page, more = await event_log.read_page(conn, "default", run.id, 5, 1000, budget)
        assert page == every[5 : 5 + len(page)] and more
        assert sum(map(len, page)) <= budget < sum(map(len, every[5 : 6 + len(page)]))
        page, more = await event_log.read_page(conn, "default", run.id, 0, 1000, 1)  # smaller than any event
        assert page == every[:1] and more
        page, more = await event_log.read_page(conn, "default", run.id, 0, 3, PAGE_BYTES)  # cut by count
        assert page == every[:3] and more
        assert await event_log.read_page(conn, "default", run.id, len(every), 1000, PAGE_BYTES) == ([], False)
        assert await event_log.read_page(conn, "other-tenant", run.id, 0, 1000, PAGE_BYTES) == ([], False)
    assert BATCH_BYTES <= PAGE_BYTES
    parsed = [pb.WatchRunResponse.FromString(raw) for raw in every]
    assert list(Logged(every)) == parsed
    taken = Logged(every)
    assert taken.take_batched().parse() == pb.WatchRunBatchedResponse(events=parsed)  # framed from the bytes as is
    assert taken.payloads == []
