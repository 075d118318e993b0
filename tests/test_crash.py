"""kill -9 in the middle of a run: after a restart the run completes with exactly one result per
evaluation and a gap-free event log, and a watcher resumes where it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalsvc.statuses import TERMINAL
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, grader_pb2, run_pb2
from tests.dbs import db_url
from tests.helpers import all_results, create_request, keyed_channel, watch_all
from tests.procs import ServerProcess

pytestmark = pytest.mark.slow


async def test_kill_9_mid_run_then_restart_completes_exactly_once(tmp_path: Path) -> None:
    db = db_url(tmp_path, "crash.db")
    # Small claims so the run spans many transactions and the kill lands between and inside them.
    # A short lease: on PostgreSQL (several replicas may share it) the restarted server waits for the
    # killed one's leases to expire instead of requeueing them at start as it does on SQLite.
    knobs = ("--claim-batch", "25", "--workers", "25", "--lease-ttl-s", "3")
    first = ServerProcess(db, tmp_path / "first.log", *knobs)
    key = first.bootstrap_key()
    assert key
    request = create_request(2000, request_id="crash-run")
    request.graders.add(name="has-answer", contains=grader_pb2.Contains(values=["answer"]))
    before_kill: list[pb.WatchRunResponse] = []
    try:
        async with keyed_channel(first.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(request)).run.id
            async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id)):
                before_kill.append(event)
                if event.counts.completed_evaluations >= 600:
                    break
    finally:
        first.kill()
    assert not any(e.HasField("run") and e.run.status in TERMINAL for e in before_kill), "killed too late"

    second = ServerProcess(db, tmp_path / "second.log", *knobs)
    try:
        async with keyed_channel(second.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            # The acknowledged run survived, and a retry of its CreateRun still answers with it.
            assert (await stub.CreateRun(request)).run.id == run_id
            resumed = await watch_all(stub, run_id, after_seq=before_kill[-1].seq)
            full = await watch_all(stub, run_id)
            final = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            results = await all_results(stub, run_id)
    finally:
        assert second.terminate() == 0

    assert [e.SerializeToString() for e in before_kill + resumed] == [e.SerializeToString() for e in full]
    assert [e.seq for e in full] == list(range(1, len(full) + 1))
    assert final.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert final.counts.completed_evaluations == final.counts.total_evaluations == 4000
    keys = [(r.item_id, r.repetition, r.grader) for r in results]
    assert len(keys) == len(set(keys)) == 4000
    assert sum(1 for e in full if e.HasField("result")) == 4000
    assert all(r.state == run_pb2.RESULT_STATE_PASSED for r in results)  # each is what the graders produce
