"""The Python client (clients/python, `evalsvc_client`) against real servers: every method, errors, retries,
and a watch that resumes across a kill -9 and restart of the server on the same port."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))

from evalsvc_client import (
    AsyncEvalClient,
    EvalClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    RetryPolicy,
    UnauthenticatedError,
    builders,
    pb,
)

from evalsvc.server import EvalServer
from tests.conftest import make_settings
from tests.procs import ServerProcess


def _items(n: int, *, wrong_every: int = 0) -> list[pb.Item]:
    return [
        builders.item(
            f"question {i}",
            f"answer {i}",
            id=f"i{i}",
            response="nope" if wrong_every and i % wrong_every == 0 else f"answer {i}",
            cost_usd=0.001,
        )
        for i in range(n)
    ]


@pytest.fixture
async def client(server: EvalServer) -> AsyncIterator[AsyncEvalClient]:
    assert server.bootstrap_key
    async with AsyncEvalClient(f"127.0.0.1:{server.port}", api_key=server.bootstrap_key) as c:
        yield c


async def test_create_watch_get_list_results(client: AsyncEvalClient) -> None:
    run = await client.create_run(
        items=_items(5, wrong_every=2),
        target=builders.provided(),
        graders=[builders.exact_match("exact"), {"name": "has", "contains": {"values": ["answer"]}}],
        display_name="client test",
        labels={"suite": "client"},
        pass_threshold=50,
    )
    assert run.id and run.display_name == "client test"
    uuid.UUID(run.request_id)  # a uuid4 was generated for the idempotency key

    events = [e async for e in client.watch(run.id)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].HasField("run") and events[-1].run.status == pb.run.RUN_STATUS_SUCCEEDED
    assert sum(e.HasField("result") for e in events) == 10

    # Resuming from a seq gives exactly the rest.
    rest = [e async for e in client.watch(run.id, after_seq=4)]
    assert [e.seq for e in rest] == [e.seq for e in events[4:]]

    got = await client.get_run(run.id)
    assert got.status == pb.run.RUN_STATUS_SUCCEEDED and got.last_seq == events[-1].seq
    assert (await client.wait(run.id)).status == pb.run.RUN_STATUS_SUCCEEDED

    results = [r async for r in client.list_results(run.id, page_size=3)]  # four pages
    assert len(results) == 10 and len({r.id for r in results}) == 10
    failed = [r async for r in client.list_results(run.id, state=pb.run.RESULT_STATE_FAILED, page_size=2)]
    assert {r.item_id for r in failed} == {"i0", "i2", "i4"}

    listed = [r.id async for r in client.list_runs(labels={"suite": "client"}, page_size=1)]
    assert listed == [run.id]
    by_status = [r.id async for r in client.list_runs(statuses=[pb.run.RUN_STATUS_SUCCEEDED])]
    assert run.id in by_status
    assert [r async for r in client.list_runs(statuses=[pb.run.RUN_STATUS_CANCELLED])] == []


async def test_create_run_is_idempotent_by_request_id(client: AsyncEvalClient) -> None:
    kwargs = {"items": _items(2), "target": "provided", "graders": [{"exact_match": {}}], "request_id": "same-key"}
    first = await client.create_run(**kwargs)  # type: ignore[arg-type]
    again = await client.create_run(**kwargs)  # type: ignore[arg-type]
    assert first.id == again.id and first.request_id == "same-key"
    request = pb.runs.CreateRunRequest(target=builders.echo(), graders=[builders.exact_match()], items=_items(1))
    created = await client.create_run_from(request)
    assert created.job_count == 1 and request.request_id  # filled in before the first attempt


async def test_list_runs_limit_and_pages(client: AsyncEvalClient) -> None:
    ids = [
        (await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])).id for _ in range(3)
    ]
    listed = [r.id async for r in client.list_runs(page_size=2)]
    assert listed[:3] == ids[::-1]  # newest first, across pages
    assert len([r async for r in client.list_runs(page_size=1, limit=2)]) == 2


async def test_cancel_run(client: AsyncEvalClient) -> None:
    run = await client.create_run(items=_items(2000), target="provided", graders=[builders.exact_match()])
    cancelled = await client.cancel_run(run.id)
    assert cancelled.status == pb.run.RUN_STATUS_CANCELLED
    assert (await client.cancel_run(run.id)).status == pb.run.RUN_STATUS_CANCELLED  # idempotent
    events = [e async for e in client.watch(run.id)]
    assert events[-1].run.status == pb.run.RUN_STATUS_CANCELLED

    done = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
    await client.wait(done.id)
    with pytest.raises(FailedPreconditionError) as info:
        await client.cancel_run(done.id)
    assert info.value.reason == "RUN_ALREADY_FINISHED"


async def test_datasets(client: AsyncEvalClient) -> None:
    dataset = await client.create_dataset("qa", description="a few questions", labels={"team": "eval"})
    assert dataset.id and dataset.item_count == 0
    added = await client.add_dataset_items(
        dataset.id, [*_items(4), {"id": "j", "input": "hi", "expected_output": "hi"}]
    )
    assert list(added.item_ids) == ["i0", "i1", "i2", "i3", "j"] and added.dataset.item_count == 5
    assert (await client.get_dataset(dataset.id)).item_count == 5
    items = [i.id async for i in client.list_dataset_items(dataset.id, page_size=2)]
    assert items == ["i0", "i1", "i2", "i3", "j"]
    other = await client.create_dataset("other")
    listed = [d.id async for d in client.list_datasets(page_size=1)]
    assert listed[:2] == [other.id, dataset.id]

    run = await client.create_run(
        dataset_id=dataset.id, item_ids=["i1", "j"], target="echo", graders=[{"exact_match": {}}]
    )
    final = await client.wait(run.id)
    assert final.dataset_id == dataset.id and final.counts.total_items == 2
    assert [r.id async for r in client.list_runs(dataset_id=dataset.id)] == [run.id]


async def test_errors_carry_reason_and_details(client: AsyncEvalClient, server: EvalServer) -> None:
    with pytest.raises(NotFoundError) as missing:
        await client.get_run("run_nope")
    assert missing.value.reason == "RUN_NOT_FOUND" and missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        await client.get_dataset("ds_nope")
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.create_run(items=_items(1), target="provided", graders=[builders.regex("(")])
    assert "graders[0].regex.pattern" in invalid.value.field_violations

    run = await client.create_run(items=_items(1), target="provided", graders=[builders.exact_match()])
    final = await client.wait(run.id)
    with pytest.raises(OutOfRangeError) as out_of_range:
        async for _ in client.watch(run.id, after_seq=final.last_seq + 5):
            pass
    assert out_of_range.value.reason == "SEQ_OUT_OF_RANGE"

    async with AsyncEvalClient(f"127.0.0.1:{server.port}", api_key="evk_bad") as bad:
        with pytest.raises(UnauthenticatedError):
            await bad.get_run(run.id)
    async with AsyncEvalClient(f"127.0.0.1:{server.port}") as anonymous:
        with pytest.raises(UnauthenticatedError) as no_key:
            await anonymous.get_run(run.id)
        assert no_key.value.reason == "API_KEY_MISSING"


async def test_retries_honour_retry_info_and_watch_shows_heartbeats(tmp_path: Path) -> None:
    # One CreateRun token every 0.25 s: the second and third calls get RESOURCE_EXHAUSTED with RetryInfo and the
    # client waits at least retry_delay, then succeeds.
    srv = EvalServer(make_settings(tmp_path, create_run_rate=4.0, create_run_burst=1, heartbeat_s=0.2))
    await srv.start()
    try:
        assert srv.bootstrap_key
        policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.01, max_backoff_s=0.02)
        async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key, retry=policy) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            runs = [
                await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])
                for _ in range(3)
            ]
            assert len({r.id for r in runs}) == 3
            assert loop.time() - started >= 0.4  # two waits of ~0.25 s, not ten 0.02 s backoffs

            no_retry = RetryPolicy(max_attempts=1)
            async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key, retry=no_retry) as once:
                with pytest.raises(Exception) as exhausted:
                    for _ in range(3):
                        await once.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])
                assert getattr(exhausted.value, "retry_delay", None)

            # A watch of a finished run from its last seq ends at once; heartbeats are exposed on request.
            await client.wait(runs[0].id)
            big = await client.create_run(
                items=_items(1), target="echo", graders=[builders.exact_match()], request_id="hb"
            )
            final = await client.wait(big.id)
            assert [e async for e in client.watch(big.id, after_seq=final.last_seq)] == []
    finally:
        await srv.stop(grace=1.0)


async def test_sync_client_every_method(server: EvalServer) -> None:
    """The blocking client, driven from a thread (the in-process server runs on this test's loop)."""
    assert server.bootstrap_key
    target, key = f"127.0.0.1:{server.port}", server.bootstrap_key

    def scenario() -> None:
        with EvalClient(target, api_key=key) as client:
            dataset = client.create_dataset("sync")
            client.add_dataset_items(dataset.id, _items(3))
            assert client.get_dataset(dataset.id).item_count == 3
            assert [i.id for i in client.list_dataset_items(dataset.id, page_size=2)] == ["i0", "i1", "i2"]
            assert dataset.id in [d.id for d in client.list_datasets()]
            run = client.create_run(dataset_id=dataset.id, target="provided", graders=[builders.exact_match()])
            events = list(client.watch(run.id))
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert client.get_run(run.id).status == pb.run.RUN_STATUS_SUCCEEDED
            assert client.wait(run.id).counts.passed == 3
            assert len(list(client.list_results(run.id, page_size=2))) == 3
            assert run.id in [r.id for r in client.list_runs(dataset_id=dataset.id)]
            with pytest.raises(FailedPreconditionError):
                client.cancel_run(run.id)
            big = client.create_run(items=_items(500), target="provided", graders=[builders.exact_match()])
            assert client.cancel_run(big.id).status == pb.run.RUN_STATUS_CANCELLED
            with pytest.raises(NotFoundError):
                client.get_run("run_nope")
            with pytest.raises(OutOfRangeError):
                list(client.watch(run.id, after_seq=10_000))

    await asyncio.to_thread(scenario)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
async def test_watch_resumes_across_kill_9_and_restart_on_the_same_port(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'resume.db'}"
    port = _free_port()
    knobs = ("--grpc-addr", f"127.0.0.1:{port}", "--claim-batch", "25", "--workers", "25")
    first = ServerProcess(db, tmp_path / "first.log", *knobs)
    second: ServerProcess | None = None
    key = first.bootstrap_key()
    assert key and first.port == port
    seqs: list[int] = []
    final: pb.Run | None = None
    try:
        async with AsyncEvalClient(f"127.0.0.1:{port}", api_key=key) as client:
            run = await client.create_run(items=_items(2000), target="provided", graders=[builders.exact_match()])
            async for event in client.watch(run.id):
                seqs.append(event.seq)
                if len(seqs) == 300:
                    first.kill()  # mid-run: the stream drops, reconnects are refused until the restart
                    second = ServerProcess(db, tmp_path / "second.log", *knobs)
                    assert second.port == port
                if event.HasField("run"):
                    final = event.run
            got = await client.get_run(run.id)
    finally:
        if first.proc.poll() is None:
            first.kill()
        if second is not None:
            assert second.terminate() == 0
    assert second is not None, "the run ended before the kill"
    assert seqs == list(range(1, len(seqs) + 1))  # every seq once, in order, across the restart
    assert final is not None and final.status == pb.run.RUN_STATUS_SUCCEEDED
    assert seqs[-1] == got.last_seq and got.counts.completed_evaluations == 2000


async def test_watch_exposes_heartbeats_only_on_request(tmp_path: Path) -> None:
    # No workers: the run stays PENDING and its stream idles, so the server sends heartbeats every 0.2 s.
    srv = EvalServer(make_settings(tmp_path, workers=0, heartbeat_s=0.2))
    await srv.start()
    try:
        assert srv.bootstrap_key
        async with AsyncEvalClient(f"127.0.0.1:{srv.port}", api_key=srv.bootstrap_key) as client:
            run = await client.create_run(items=_items(1), target="echo", graders=[builders.exact_match()])
            seen: list[pb.WatchRunResponse] = []
            async for event in client.watch(run.id, heartbeats=True):
                seen.append(event)
                if event.HasField("heartbeat"):
                    break
            assert seen[0].seq == 1 and seen[-1].seq == 0 and seen[-1].heartbeat.last_seq == 1

            async def first_two() -> list[int]:
                got = []
                async for event in client.watch(run.id):
                    got.append(event.seq)
                    if len(got) == 2:
                        break
                return got

            # Without heartbeats=True the idle stream yields nothing past the creation event.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(first_two(), timeout=0.6)
            await client.cancel_run(run.id)
    finally:
        await srv.stop(grace=1.0)
