"""Regression: clients that cancel WatchRun must not crash the server.

When a client cancels a stream while the server is sending, grpc.aio cancels the RPC's task at its
`context.write` and abandons the handler's async generators; asyncio closes them later, in a task of
their own, after the RPC has ended. Cleanup code that then asks the call's context for anything that
reaches grpc's core (`context.peer()` did, from the access log) dereferences null in cygrpc and kills
the process with SIGSEGV and no log line. grpcio 1.85.1 does that on every such call, so cancelling
mid-stream crashed a server that read the peer late on the first try; cancelling right after the
terminal event (what evalctl used to do) crashed it within a few runs.

The server runs in a subprocess so that a segfault fails this test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc.statuses import TERMINAL
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests.helpers import create_request, keyed_channel, watch_all
from tests.procs import ServerProcess

pytestmark = pytest.mark.slow
ROUNDS = 40


def alive(server: ServerProcess, wait_s: float = 0.0) -> str:
    """'' while the server runs; otherwise what it died of, with the end of its log (a faulthandler dump).

    `wait_s` gives a server that dropped the connection time to finish dying."""
    try:
        code = server.proc.wait(wait_s) if wait_s else server.proc.poll()
    except subprocess.TimeoutExpired:
        code = None
    if code is None:
        return ""
    return f"server exited with {code}:\n{server.log_path.read_text(errors='replace')[-6000:]}"


async def test_cancelled_watches_do_not_crash_the_server(tmp_path: Path) -> None:
    server = ServerProcess(
        f"sqlite+aiosqlite:///{tmp_path / 'cancel.db'}", tmp_path / "server.log", env={"PYTHONFAULTHANDLER": "1"}
    )
    try:
        key = server.bootstrap_key()
        assert key
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            finished = (await stub.CreateRun(create_request(200))).run
            last_seq = (await watch_all(stub, finished.id))[-1].seq
            assert last_seq > 200

            for round_ in range(ROUNDS):
                # Mid-stream: the server is replaying 200+ stored events, so the cancel lands on a write.
                call = stub.WatchRun(pb.WatchRunRequest(run_id=finished.id, after_seq=0))
                async for _ in call:
                    call.cancel()
                    break
                # Before the first event: the call may already be cancelled when the handler starts.
                stub.WatchRun(pb.WatchRunRequest(run_id=finished.id, after_seq=0)).cancel()
                # After the terminal event, racing the server's own OK: the pattern of the crash report.
                run = (await stub.CreateRun(create_request(3))).run
                call = stub.WatchRun(pb.WatchRunRequest(run_id=run.id, after_seq=0))
                async for event in call:
                    if event.HasField("run") and event.run.status in TERMINAL:
                        call.cancel()
                        break
                # The abandoned generators are closed after the call ended; a later call gives them the time.
                got = await stub.GetRun(pb.GetRunRequest(run_id=run.id))
                assert got.run.status in TERMINAL, f"round {round_}"
                assert not (died := alive(server)), f"round {round_}: {died}"

            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert [e.seq for e in await watch_all(stub, finished.id, after_seq=last_seq - 1)] == [last_seq]
        log = server.log_path.read_text(errors="replace")
        assert "WatchRun CANCELLED" in log, "no watch was cancelled while the server was still sending"
        assert "Fatal Python error" not in log
    except grpc.aio.AioRpcError as error:
        pytest.fail(f"{error.code().name}: {error.details()}\n{alive(server, wait_s=5.0)}")
    finally:
        if server.proc.poll() is None:
            assert server.terminate() == 0
        else:
            server.wait()
