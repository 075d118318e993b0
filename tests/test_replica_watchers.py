"""Watchers on different replicas across kill -9s (PostgreSQL scale-out): three replicas share one
run; one watcher follows it on each, dropping its stream at random moments and resuming with its
last seq, also on the restarted process (new port) after its replica is killed. Each watcher must
see the full sequence 1..last_seq exactly once, in order, ending with the terminal run event, while
the run records exactly one result per evaluation.

A fresh seed per session explores new interleavings; the test prints it, so a failure shows it and
`EVALSVC_TEST_SEED=<seed>` replays the same choices (the timings of course differ).
`pytest --long` kills 12 times during a larger run instead of 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from evalsvc.statuses import TERMINAL
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, grader_pb2, run_pb2
from tests import dbs
from tests.helpers import all_results, create_request, keyed_channel
from tests.procs import ServerProcess, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        (reason := dbs.postgres_unavailable()) is not None, reason=reason or "PostgreSQL is not reachable"
    ),
]
# A short lease lets the survivors take over a killed replica's jobs quickly; small claims spread
# the run over all three replicas.
KNOBS = ("--lease-ttl-s", "2", "--poll-interval-s", "0.2", "--claim-batch", "20", "--workers", "20", "--grace-s", "0.5")
# Items (two graders each), kills, and a bound on the whole run for a stuck test (not a speed claim).
SHORT = (4000, 4, 180)
LONG = (15000, 12, 420)
STREAM_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def seed() -> int:
    """The session's seed: EVALSVC_TEST_SEED to replay one, else a fresh one."""
    return int(os.environ.get("EVALSVC_TEST_SEED") or random.SystemRandom().randrange(2**32))


@contextlib.asynccontextmanager
async def connect(server: ServerProcess, key: str) -> AsyncIterator[eval_run_service_pb2_grpc.EvalRunServiceAsyncStub]:
    """A stub on its own channel to `server`, closed on exit."""
    async with keyed_channel(server.port, key) as channel:
        yield eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


class Replica:
    """One replica's place in the cluster: the process serving it now, replaced by a new process (on
    a new port) after every kill. Watchers tell a broken stream of a killed process from a bug by its
    generation."""

    def __init__(self, name: str, url: str, logs: Path) -> None:
        self.name = name
        self._url = url
        self._logs = logs
        self.generation = -1
        self.killed_generation = -1
        self.server: ServerProcess | None = None
        self._restarted = asyncio.Event()

    async def start(self) -> ServerProcess:
        """Start the next process of this replica (off the event loop: the watchers keep reading)."""
        log = self._logs / f"{self.name}-{self.generation + 1}.log"
        self.server = await start_server(self._url, log, *KNOBS)
        self.generation += 1
        self._restarted.set()
        self._restarted = asyncio.Event()
        return self.server

    @property
    def serving(self) -> bool:
        """True unless the replica's last process was killed and the next one is not up yet."""
        return self.killed_generation < self.generation

    def live(self) -> tuple[ServerProcess, int]:
        """The serving process and its generation."""
        assert self.server is not None, f"replica {self.name} was never started"
        return self.server, self.generation

    def kill(self) -> None:
        """kill -9 the serving process (marked first, so its watcher knows why its stream broke)."""
        server, self.killed_generation = self.live()
        server.kill()

    async def restarted_after(self, generation: int) -> None:
        """Wait until a process newer than `generation` serves this replica."""
        while self.generation <= generation:
            await self._restarted.wait()

    def stop(self) -> None:
        """SIGTERM the serving process, if it is still running."""
        if self.server is not None and self.server.proc.poll() is None:
            self.server.terminate()


class Progress:
    """The most completed evaluations any watcher has seen, and a wake-up when it passes a mark."""

    def __init__(self) -> None:
        self.completed = 0
        self._mark = math.inf
        self._reached = asyncio.Event()

    def saw(self, event: pb.WatchRunResponse) -> None:
        self.completed = max(self.completed, event.counts.completed_evaluations)
        if self.completed >= self._mark:
            self._reached.set()

    async def reach(self, mark: int) -> None:
        """Return once some watcher has seen `mark` completed evaluations."""
        self._mark = mark
        self._reached.clear()
        if self.completed < mark:
            await self._reached.wait()


class Watcher:
    """Follows the run on one replica: drops its stream after a random number of events and resumes
    with after_seq = its last seq; when the replica's process is killed, resumes on the next one."""

    def __init__(self, replica: Replica, rng: random.Random, progress: Progress) -> None:
        self.replica = replica
        self.events: list[pb.WatchRunResponse] = []
        self.resumes = 0
        self.ended_on = -1  # the generation of the process that sent the terminal event
        self._rng = rng
        self._progress = progress

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    async def follow(self, key: str, run_id: str) -> None:
        """Watch to the terminal event, across every process of the replica."""
        while True:
            server, generation = self.replica.live()
            async with connect(server, key) as stub:
                if await self._on_process(stub, run_id, generation):
                    self.ended_on = generation
                    return
            await self.replica.restarted_after(generation)

    async def _on_process(
        self, stub: eval_run_service_pb2_grpc.EvalRunServiceAsyncStub, run_id: str, generation: int
    ) -> bool:
        """Watch on one process until the run ends (True) or the process is killed (False)."""
        while True:
            try:
                if await self._stream(stub, run_id):
                    return True
            except grpc.aio.AioRpcError as error:
                if error.code() in STREAM_BROKEN and self.replica.killed_generation == generation:
                    return False
                raise
            self.resumes += 1

    async def _stream(self, stub: eval_run_service_pb2_grpc.EvalRunServiceAsyncStub, run_id: str) -> bool:
        """One WatchRun call from the last seq: True at the terminal event, False when dropped on purpose."""
        cut = self._rng.randint(1, 400)
        call = stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=self.last_seq))
        async for event in call:
            if event.HasField("heartbeat"):
                continue
            assert event.seq == self.last_seq + 1, (
                f"{self.replica.name}: seq {event.seq} after {self.last_seq} (gap or duplicate)"
            )
            self.events.append(event)
            self._progress.saw(event)
            if event.HasField("run") and event.run.status in TERMINAL:
                return True
            cut -= 1
            if cut == 0:
                call.cancel()  # leave and resume, as a flaky client would
                return False
        raise AssertionError(f"{self.replica.name}: the stream ended before the terminal event")


class Cluster:
    """Three replicas on one database, the key the first one minted, and the run under test."""

    def __init__(self, url: str, logs: Path) -> None:
        self.replicas = [Replica(name, url, logs) for name in "abc"]
        self.key = ""
        self.run_id = ""
        self.last_kill = 0.0  # wall clock, as the server stamps events

    async def start(self, request: pb.CreateRunRequest) -> None:
        """Start the replicas (the first alone: it mints the key) and create the run on the first."""
        first = await self.replicas[0].start()
        self.key = first.bootstrap_key() or ""
        assert self.key, "the first replica mints the first key"
        async with asyncio.TaskGroup() as group:
            for replica in self.replicas[1:]:
                group.create_task(replica.start())
        async with connect(first, self.key) as stub:
            self.run_id = (await stub.CreateRun(request)).run.id

    async def kill_at_random_moments(self, progress: Progress, rng: random.Random, total: int, kills: int) -> None:
        """kill -9 a random serving replica each time the run passes a random mark (between 5% and
        50% of the evaluations) and restart it in the background, so kills also land while other
        replicas are still restarting (all three may be down at once)."""
        marks = sorted(rng.sample(range(total // 20, total // 2), kills))
        restarts: list[asyncio.Task[ServerProcess]] = []
        async with asyncio.TaskGroup() as group:
            for mark in marks:
                await progress.reach(mark)
                while not (serving := [r for r in self.replicas if r.serving]):
                    await asyncio.wait([t for t in restarts if not t.done()], return_when=asyncio.FIRST_COMPLETED)
                victim = rng.choice(serving)
                victim.kill()
                self.last_kill = time.time()
                print(f"kill -9 {victim.name}{victim.generation} having seen {progress.completed} evaluations")
                restarts.append(group.create_task(victim.start()))

    async def outcome(self, replica: Replica) -> tuple[run_pb2.Run, list[run_pb2.Result]]:
        """The run as `replica` serves it, and all its results, page by page."""
        async with connect(replica.live()[0], self.key) as stub:
            run = (await stub.GetRun(pb.GetRunRequest(run_id=self.run_id))).run
            return run, await all_results(stub, self.run_id)

    def stop(self) -> None:
        """SIGTERM every replica's live process (also after a failure, so no server outlives the test)."""
        for replica in self.replicas:
            replica.stop()


async def test_watchers_on_three_replicas_resume_across_kills_and_see_every_event_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    items, kills, limit_s = LONG if request.config.getoption("--long") else SHORT
    chosen = seed()
    print(f"seed {chosen} (EVALSVC_TEST_SEED={chosen} replays it)")
    rng = random.Random(chosen)
    run_request = create_request(items, request_id="replica-watchers")
    run_request.graders.add(name="has-answer", contains=grader_pb2.Contains(values=["answer"]))
    total = 2 * items
    cluster = Cluster(dbs.postgres_url(tmp_path, "watchers"), tmp_path)
    progress = Progress()
    watchers = [Watcher(replica, random.Random(rng.random()), progress) for replica in cluster.replicas]
    try:
        await cluster.start(run_request)
        async with asyncio.timeout(limit_s), asyncio.TaskGroup() as group:
            group.create_task(cluster.kill_at_random_moments(progress, rng, total, kills))
            for watcher in watchers:
                group.create_task(watcher.follow(cluster.key, cluster.run_id))
        run, results = await cluster.outcome(cluster.replicas[0])
    finally:
        cluster.stop()
    print(f"last_seq {run.last_seq}; resumes per watcher {[w.resumes for w in watchers]}")
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
    ended = watchers[0].events[-1].event_time.ToNanoseconds() / 1e9
    assert ended > cluster.last_kill, "the run ended before the last kill: the test would test nothing"
    assert run.counts.completed_evaluations == run.counts.total_evaluations == total
    assert len(results) == len({r.id for r in results}) == total
    assert len({(r.item_id, r.repetition, r.grader) for r in results}) == total
    assert all(r.state == run_pb2.RESULT_STATE_PASSED for r in results)  # what the target and graders produce
    assert sum(replica.generation for replica in cluster.replicas) == kills  # each kill restarted its replica
    reference = [e.SerializeToString() for e in watchers[0].events]
    for watcher in watchers:
        # The run ended after the last kill, so a watcher that followed its replica across every
        # restart (to each new port) got the terminal event from the replica's latest process.
        assert watcher.ended_on == watcher.replica.generation, watcher.replica.name
        assert [e.seq for e in watcher.events] == list(range(1, run.last_seq + 1)), watcher.replica.name
        assert watcher.events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED, watcher.replica.name
        assert [e.SerializeToString() for e in watcher.events] == reference, watcher.replica.name
    assert sum(e.HasField("result") for e in watchers[0].events) == total
