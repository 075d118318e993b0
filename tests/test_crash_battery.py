"""The crash battery: kill -9 the server at random moments of a 5,000-item run, restart it each
time, with watchers resuming across every kill. On SQLite and on PostgreSQL.

`pytest --long` kills 50 times instead of 10.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest

from evalsvc.statuses import TERMINAL
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, grader_pb2, run_pb2
from tests import dbs
from tests.helpers import all_results, create_request, keyed_channel
from tests.procs import ServerProcess

pytestmark = pytest.mark.slow
ITEMS = 5000
KNOBS = ("--claim-batch", "100", "--workers", "100", "--grace-s", "0.5")


def _url(engine: str, tmp_path: Path) -> str:
    if engine == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'battery.db'}"
    reason = dbs.postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return dbs.postgres_url(tmp_path, "battery")


class Watcher:
    """Follows the run across server restarts, resuming from its last seq every time the stream breaks."""

    def __init__(self) -> None:
        self.events: list[pb.WatchRunResponse] = []
        self.done = False
        self.kill_at = 0  # the test kills the server once this many events were seen
        self.reached = asyncio.Event()

    async def follow(self, port: int, key: str, run_id: str, rng: random.Random) -> None:
        """Watch until the stream breaks (server killed) or the run ends; sometimes drop it on purpose."""
        async with keyed_channel(port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            while not self.done:
                drop_after = rng.randint(50, 2000)
                after = self.events[-1].seq if self.events else 0
                try:
                    async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=after)):
                        if event.HasField("heartbeat"):
                            continue
                        assert event.seq == (self.events[-1].seq if self.events else 0) + 1, "gap or duplicate"
                        self.events.append(event)
                        if len(self.events) >= self.kill_at:
                            self.reached.set()
                        if event.HasField("run") and event.run.status in TERMINAL:
                            self.done = True
                            return
                        drop_after -= 1
                        if drop_after == 0:
                            break  # leave and resume, as a flaky client would
                except grpc.aio.AioRpcError as error:
                    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        return  # the server died or is stopping: resume on the next one
                    raise


# One engine per pass: SQLite in `make test`, PostgreSQL in `make test-postgres` (.ci/run runs both), so the
# suite pays for one battery of kills each time.
@pytest.mark.parametrize("engine", ["postgres" if dbs.USE_POSTGRES else "sqlite"])
async def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    kills = 50 if request.config.getoption("--long") else 10
    rng = random.Random(f"{engine}-battery")
    url = _url(engine, tmp_path)
    run_request = create_request(ITEMS, request_id="battery")
    run_request.graders.add(name="has-answer", contains=grader_pb2.Contains(values=["answer"]))
    watchers = [Watcher() for _ in range(3)]
    server = ServerProcess(url, tmp_path / "server-0.log", *KNOBS)
    key = server.bootstrap_key()
    assert key
    run_id = ""
    try:
        for cycle in range(kills + 1):
            async with keyed_channel(server.port, key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                run_id = (await stub.CreateRun(run_request)).run.id  # a retry after every crash: same run
            lead = watchers[0]
            lead.kill_at = len(lead.events) + rng.randint(50, (2 * ITEMS) // (kills + 1))  # a random moment
            lead.reached.clear()
            follows = [asyncio.create_task(w.follow(server.port, key, run_id, rng)) for w in watchers]
            if cycle < kills:
                await asyncio.wait_for(lead.reached.wait(), 120)
                server.kill()
                assert not lead.done, "the run ended before the last kill: the battery would test nothing"
                await asyncio.gather(*follows)
                server = ServerProcess(url, tmp_path / f"server-{cycle + 1}.log", *KNOBS)
            else:
                await asyncio.wait_for(asyncio.gather(*follows), 240)
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            results = await all_results(stub, run_id)
    finally:
        server.terminate()
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert run.counts.completed_evaluations == run.counts.total_evaluations == 2 * ITEMS
    keys = [(r.item_id, r.repetition, r.grader) for r in results]
    assert len(keys) == len(set(keys)) == 2 * ITEMS
    assert all(r.state == run_pb2.RESULT_STATE_PASSED for r in results)  # what the target and graders produce
    reference = [e.SerializeToString() for e in watchers[0].events]
    assert [e.seq for e in watchers[0].events] == list(range(1, run.last_seq + 1))
    for watcher in watchers[1:]:
        assert [e.SerializeToString() for e in watcher.events] == reference
