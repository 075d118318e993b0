"""Scale-out on PostgreSQL: replicas share runs, watchers on any replica see everything, a dead
replica's work is finished by the survivor, and a replica that wakes up after losing its leases
records nothing. Each test starts its own server processes on a scratch PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from evalsvc.statuses import TERMINAL
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, item_pb2, run_pb2, target_pb2
from tests import dbs
from tests.fake_llm import FakeEndpoint, chat_reply
from tests.helpers import all_results, create_request, exact, keyed_channel, watch_all
from tests.procs import ServerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        (reason := dbs.postgres_unavailable()) is not None, reason=reason or "PostgreSQL is not reachable"
    ),
]
FAST = ("--lease-ttl-s", "2", "--poll-interval-s", "0.2", "--claim-batch", "50", "--workers", "50")


def stub(server: ServerProcess, key: str) -> tuple[object, eval_run_service_pb2_grpc.EvalRunServiceStub]:
    channel = keyed_channel(server.port, key)
    return channel, eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


def replicas(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[ServerProcess, ServerProcess, str]:
    url = dbs.postgres_url(tmp_path, "replicas")
    first = ServerProcess(url, tmp_path / "a.log", *FAST, *extra, env=env)
    key = first.bootstrap_key()
    assert key, "the first replica mints the first key"
    second = ServerProcess(url, tmp_path / "b.log", *FAST, *extra, env=env)
    return first, second, key


async def resuming_watcher(
    stubs: list[eval_run_service_pb2_grpc.EvalRunServiceStub], run_id: str, seed: int
) -> list[pb.WatchRunResponse]:
    """Watch to the end, dropping the stream at random moments and resuming on a random replica."""
    rng = random.Random(seed)
    received: list[pb.WatchRunResponse] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cut = rng.randint(20, 400)
        call = rng.choice(stubs).WatchRun(
            pb.WatchRunRequest(run_id=run_id, after_seq=received[-1].seq if received else 0)
        )
        async for event in call:
            if event.HasField("heartbeat"):
                continue
            received.append(event)
            if event.HasField("run") and event.run.status in TERMINAL:
                return received
            cut -= 1
            if cut == 0:
                call.cancel()
                break
    raise AssertionError("the watcher did not see the terminal event in time")


async def test_watchers_on_any_replica_see_every_event_once_and_idempotency_spans_replicas(tmp_path: Path) -> None:
    first, second, key = replicas(tmp_path)
    try:
        ch_a, a = stub(first, key)
        ch_b, b = stub(second, key)
        async with ch_a, ch_b:  # type: ignore[attr-defined]
            request = create_request(1500, request_id="same-on-both")
            created = await asyncio.gather(*(s.CreateRun(request) for s in (a, b, a, b)))
            assert len({c.run.id for c in created}) == 1
            run_id = created[0].run.id
            seen = await asyncio.gather(*(resuming_watcher([a, b], run_id, seed) for seed in range(3)))
            full = await watch_all(b, run_id)
    finally:
        assert first.terminate() == 0 and second.terminate() == 0
    assert [e.seq for e in full] == list(range(1, len(full) + 1))
    for events in seen:
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in full]
    assert sum(e.HasField("result") for e in full) == 1500
    for log in (first.log_path, second.log_path):  # both replicas executed part of the run
        assert "listening on" in log.read_text()


async def test_survivor_finishes_the_run_of_a_killed_replica_exactly_once(tmp_path: Path) -> None:
    first, second, key = replicas(tmp_path)
    try:
        ch_b, b = stub(second, key)
        ch_a, a = stub(first, key)
        async with ch_a, ch_b:  # type: ignore[attr-defined]
            run_id = (await a.CreateRun(create_request(4000))).run.id
            async for event in b.WatchRun(pb.WatchRunRequest(run_id=run_id)):
                if event.counts.completed_evaluations >= 800:
                    break
            first.kill()
            killed_at = time.monotonic()
            rest = await watch_all(b, run_id)
            finished_after = time.monotonic() - killed_at
            full = await watch_all(b, run_id)
            run = (await b.GetRun(pb.GetRunRequest(run_id=run_id))).run
            results = await all_results(b, run_id)
    finally:
        assert second.terminate() == 0
    assert rest[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert run.counts.completed_evaluations == 4000
    assert len({(r.item_id, r.repetition, r.grader) for r in results}) == len(results) == 4000
    assert [e.seq for e in full] == list(range(1, len(full) + 1))
    assert finished_after < 60  # lease TTL 2 s + sweep 0.2 s + the remaining work, with room for a slow machine


async def pause_outside_transactions(replica: ServerProcess, url: str) -> None:
    """SIGSTOP the replica at a moment it has no transaction open: stopped inside one (a lease renewal
    every 0.7 s here), it held the row locks of every job, and the other replica, whose claims skip
    locked rows, could take over none of them until it woke (once in a full run of the suite)."""
    for _ in range(100):
        os.kill(replica.proc.pid, signal.SIGSTOP)
        if not await dbs.transactions_open(url):
            return
        os.kill(replica.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    raise AssertionError("the replica always had a transaction open")


async def test_a_replica_that_wakes_after_losing_its_leases_records_nothing(tmp_path: Path) -> None:
    """Its calls answered while it was paused, the woken replica records none of the jobs another replica
    took over: the fence. It wakes while the run is still active (had the run ended, it would hear so and
    stop its work instead of recording, see the test below)."""
    held = threading.Event()
    in_flight, later = chat_reply("a"), chat_reply("a")
    # The first replica's first calls (an endpoint takes 8 at once at first) stay in flight until it has
    # been paused and woken: with a delay alone, a slow machine finished them all before the pause.
    in_flight.gate = held
    later.delay_s = 0.5
    with FakeEndpoint(*[in_flight] * 8, later) as llm:
        url = dbs.postgres_url(tmp_path, "fencing")
        env = {"EVALSVC_OUTBOUND_ALLOW": "127.0.0.1"}
        paused = ServerProcess(url, tmp_path / "a.log", *FAST, env=env)
        key = paused.bootstrap_key() or ""
        survivor: ServerProcess | None = None
        try:
            ch_a, a = stub(paused, key)
            async with ch_a:  # type: ignore[attr-defined]
                target = target_pb2.Target(
                    chat=target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url=llm.url + "/v1"), model="m")
                )
                run_id = (
                    await a.CreateRun(
                        pb.CreateRunRequest(
                            items=[item_pb2.Item(input=f"q{i}", expected_output="a") for i in range(50)],
                            target=target,
                            graders=[exact()],
                        )
                    )
                ).run.id
                # The first replica holds every job (one claim of 50, 50 workers), 8 calls in flight.
                assert await asyncio.to_thread(llm.wait_seen, 8, 30)
            await pause_outside_transactions(paused, url)
            # Two workers: the survivor takes over the expired leases slowly, and the run is still going
            # when the first replica wakes.
            survivor = ServerProcess(url, tmp_path / "b.log", *FAST, "--workers", "2", env=env)
            assert await asyncio.to_thread(llm.wait_seen, 9, 30), "the survivor took over nothing"
            os.kill(paused.proc.pid, signal.SIGCONT)
            held.set()
            ch_b, b = stub(survivor, key)
            async with ch_b:  # type: ignore[attr-defined]
                full = await asyncio.wait_for(watch_all(b, run_id), 60)
                run = (await b.GetRun(pb.GetRunRequest(run_id=run_id))).run
                results = await all_results(b, run_id)
        finally:
            held.set()
            os.kill(paused.proc.pid, signal.SIGCONT)
            paused.terminate()
            if survivor is not None:
                survivor.terminate()
    assert "fenced out" in paused.log_path.read_text(), "the woken replica never tried to record"
    assert full[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert run.counts.completed_evaluations == 50
    assert len({r.item_id for r in results}) == len(results) == 50
    assert [e.seq for e in full] == list(range(1, len(full) + 1))


async def test_a_run_cancelled_on_another_replica_frees_the_executing_replicas_workers_at_once(
    tmp_path: Path,
) -> None:
    """A cancel reaches the replica executing the run (RUNS_ENDED_CHANNEL): its calls to a hung endpoint
    end at once instead of holding its workers until the endpoint's timeout."""
    gate = threading.Event()
    hung_reply = chat_reply("a")
    hung_reply.gate = gate
    with FakeEndpoint(hung_reply) as hung, FakeEndpoint(chat_reply("a")) as quick:
        url = dbs.postgres_url(tmp_path, "cancel")
        env = {"EVALSVC_OUTBOUND_ALLOW": "127.0.0.1"}
        executing = ServerProcess(  # one tenant may hold all 4 workers, as the cancelled run does
            url,
            tmp_path / "a.log",
            *FAST,
            "--workers",
            "4",
            "--max-workers-per-tenant",
            "4",
            "--lease-ttl-s",
            "60",
            env=env,
        )
        key = executing.bootstrap_key() or ""
        api_only = ServerProcess(url, tmp_path / "b.log", *FAST, "--workers", "0", env=env)
        try:
            ch_b, b = stub(api_only, key)
            async with ch_b:  # type: ignore[attr-defined]

                def chat_run(endpoint: FakeEndpoint, n: int) -> pb.CreateRunRequest:
                    target = target_pb2.Target(
                        chat=target_pb2.ChatTarget(
                            endpoint=target_pb2.Endpoint(base_url=endpoint.url + "/v1", timeout_s=300), model="m"
                        )
                    )
                    items = [item_pb2.Item(input=f"q{i}", expected_output="a") for i in range(n)]
                    return pb.CreateRunRequest(items=items, target=target, graders=[exact()])

                hung_run = (await b.CreateRun(chat_run(hung, 8))).run.id
                assert await asyncio.to_thread(hung.wait_seen, 4, 30), "the executing replica never called"
                cancelled = await b.CancelRun(pb.CancelRunRequest(run_id=hung_run))
                assert cancelled.run.status == run_pb2.RUN_STATUS_CANCELLED
                started = time.monotonic()
                quick_run = (await b.CreateRun(chat_run(quick, 4))).run.id
                events = await asyncio.wait_for(watch_all(b, quick_run), 30)
                took = time.monotonic() - started
        finally:
            gate.set()
            assert executing.terminate() == 0 and api_only.terminate() == 0
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert took < 10, f"the second run waited {took:.1f} s for workers the cancelled run held"
    assert len(hung.seen) == 4  # nothing of the cancelled run was called after the cancel
