"""WatchRun: ordered, gap-free, resumable, shared by many watchers, safe for slow ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from evalsvc.events.watch import BATCH_BYTES
from evalsvc.server import EvalServer
from evalsvc.statuses import TERMINAL
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests.conftest import make_settings
from tests.helpers import create_request, error_reason, keyed_channel, watch_all


def assert_complete_log(events: list[pb.WatchRunResponse], total: int) -> None:
    """Seqs 1..N without gaps; created first, terminal last, one event per result in between."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].run.status == run_pb2.RUN_STATUS_PENDING
    assert events[-1].run.status in TERMINAL
    results = [e.result for e in events if e.HasField("result")]
    assert len(results) == total
    assert len({(r.item_id, r.repetition, r.grader) for r in results}) == total


async def test_watch_from_start_sees_every_event_with_counts(runs) -> None:
    created = await runs.CreateRun(create_request(40))
    events = await watch_all(runs, created.run.id)
    assert_complete_log(events, 40)
    completed = [e.counts.completed_evaluations for e in events]
    assert completed == sorted(completed) and completed[-1] == 40
    assert all(e.counts.total_evaluations == 40 for e in events)
    statuses = [e.run.status for e in events if e.HasField("run")]
    assert statuses == [run_pb2.RUN_STATUS_PENDING, run_pb2.RUN_STATUS_RUNNING, run_pb2.RUN_STATUS_SUCCEEDED]
    assert all(e.event_time.seconds > 0 for e in events)


async def test_resume_from_the_middle_gives_exactly_the_rest(runs) -> None:
    created = await runs.CreateRun(create_request(30))
    full = await watch_all(runs, created.run.id)
    for k in (1, 7, len(full) - 1):
        rest = await watch_all(runs, created.run.id, after_seq=k)
        assert [e.SerializeToString() for e in rest] == [e.SerializeToString() for e in full[k:]]


async def test_watch_of_finished_run_at_its_last_seq_ends_at_once(runs) -> None:
    created = await runs.CreateRun(create_request(2))
    full = await watch_all(runs, created.run.id)
    assert await watch_all(runs, created.run.id, after_seq=full[-1].seq) == []


async def test_get_run_then_watch_from_last_seq(runs) -> None:
    created = await runs.CreateRun(create_request(10))
    snapshot = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id))).run
    rest = await watch_all(runs, created.run.id, after_seq=snapshot.last_seq)
    assert rest[0].seq == snapshot.last_seq + 1
    assert rest[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED


async def test_fifty_concurrent_watchers_see_the_same_sequence(runs) -> None:
    created = await runs.CreateRun(create_request(300))
    seen = await asyncio.gather(*(watch_all(runs, created.run.id) for _ in range(50)))
    reference = [e.SerializeToString() for e in seen[0]]
    assert_complete_log(seen[0], 300)
    assert all([e.SerializeToString() for e in events] == reference for events in seen)


async def test_disconnected_watcher_resumes_with_its_last_seq(runs) -> None:
    created = await runs.CreateRun(create_request(500))
    received: list[pb.WatchRunResponse] = []
    for cut_after in (3, 50, 170):
        call = runs.WatchRun(pb.WatchRunRequest(run_id=created.run.id, after_seq=received[-1].seq if received else 0))
        async for event in call:
            if not event.HasField("heartbeat"):
                received.append(event)
            if len(received) >= cut_after:
                call.cancel()  # the watcher drops its connection mid-run
                break
    received.extend(await watch_all(runs, created.run.id, after_seq=received[-1].seq))
    assert_complete_log(received, 500)


async def test_watch_unknown_run_is_not_found(runs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch_all(runs, "run_nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "RUN_NOT_FOUND"


@pytest.mark.parametrize("after_seq", [-1, 1_000])
async def test_watch_beyond_last_seq_is_out_of_range(runs, after_seq: int) -> None:
    created = await runs.CreateRun(create_request(1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch_all(runs, created.run.id, after_seq=after_seq)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_reason(err.value) == "SEQ_OUT_OF_RANGE"


async def _paused_server(tmp_path: Path, **overrides: object) -> EvalServer:
    srv = EvalServer(make_settings(tmp_path, **overrides))
    await srv.start()
    await srv.executor.stop()  # runs stay pending until the test lets the executor go
    return srv


async def test_idle_watch_gets_heartbeats_with_last_seq(tmp_path: Path) -> None:
    srv = await _paused_server(tmp_path, heartbeat_s=0.05)
    try:
        async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            created = await stub.CreateRun(create_request(1))
            call = stub.WatchRun(pb.WatchRunRequest(run_id=created.run.id))
            first = await call.read()
            beat = await call.read()
            call.cancel()
            assert first.seq == 1 and first.run.status == run_pb2.RUN_STATUS_PENDING
            assert beat.HasField("heartbeat") and beat.heartbeat.last_seq == 1 and beat.seq == 0
    finally:
        await srv.stop(grace=0.5)


# A client that reads nothing and accepts only ~1 KiB in flight: the server's writes to it stall.
STALLED_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


async def test_slow_watcher_catches_up_from_the_database(tmp_path: Path) -> None:
    srv = await _paused_server(tmp_path, watch_buffer=8, claim_batch=20)
    try:
        async with (
            keyed_channel(srv.port, srv.bootstrap_key or "") as channel,
            keyed_channel(srv.port, srv.bootstrap_key or "", options=STALLED_READER) as stalled,
        ):
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            created = await stub.CreateRun(create_request(2000))
            call = eval_run_service_pb2_grpc.EvalRunServiceStub(stalled).WatchRun(
                pb.WatchRunRequest(run_id=created.run.id)
            )
            first = await call.read()  # subscribed; it reads nothing more until the run has ended
            await srv.executor.start()
            await watch_all(stub, created.run.id)  # ~100 batches published past the slow watcher's 8 slots
            events = [first]
            while (event := await call.read()) is not grpc.aio.EOF:
                if not event.HasField("heartbeat"):
                    events.append(event)
            assert_complete_log(events, 2000)
    finally:
        await srv.stop(grace=0.5)


async def test_server_shutdown_ends_watches_with_unavailable(tmp_path: Path) -> None:
    srv = await _paused_server(tmp_path)
    async with keyed_channel(srv.port, srv.bootstrap_key or "") as channel:
        stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        created = await stub.CreateRun(create_request(1))
        call = stub.WatchRun(pb.WatchRunRequest(run_id=created.run.id))
        await call.read()
        stopping = asyncio.create_task(srv.stop(grace=5.0))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await stopping


async def _batched(runs, run_id: str, after_seq: int = 0, max_events: int = 0) -> list[list[pb.WatchRunResponse]]:  # type: ignore[no-untyped-def]
    request = pb.WatchRunBatchedRequest(run_id=run_id, after_seq=after_seq, max_events=max_events)
    return [list(batch.events) async for batch in runs.WatchRunBatched(request, timeout=30)]


async def test_batched_watch_carries_the_same_events_in_fewer_messages(runs) -> None:
    created = await runs.CreateRun(create_request(300, repetitions=2))
    live = await _batched(runs, created.run.id, max_events=50)  # subscribes while the run executes
    events = [e for batch in live for e in batch]
    assert_complete_log(events, 600)
    assert all(1 <= len(batch) <= 50 for batch in live) and len(live) < len(events)
    assert [e.seq for e in events] == [e.seq for e in await watch_all(runs, created.run.id)]
    # Resuming mid-log gives exactly the rest, from the database in messages of at most max_events
    # and BATCH_BYTES: as full as that allows, so a reader gets few messages.
    rest = await _batched(runs, created.run.id, after_seq=100, max_events=1000)
    assert [e.seq for batch in rest for e in batch] == [e.seq for e in events[100:]]
    sizes = [sum(event.ByteSize() for event in batch) for batch in rest]
    assert all(size <= BATCH_BYTES for size in sizes), sizes
    assert len(rest) <= 1 + sum(sizes) // (BATCH_BYTES - 1024), sizes


async def test_batched_watch_rejects_a_bad_batch_size(runs) -> None:
    created = await runs.CreateRun(create_request(1))
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await _batched(runs, created.run.id, max_events=10_001)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
