"""A wake that arrives while a loop is busy is not lost: the loop does not wait out its poll interval.

The executor's claim loop and the webhook sender's loop poll (--poll-interval-s, 1 s by default) and are
woken early: the executor by a committed CreateRun, the sender by a free slot, both by a stop. Each
cleared its wake *after* its claim, so a wake during the claim was lost: a run committed while the
executor claimed waited a whole poll interval to start, and a stop landing on a claim waited one per loop
(0.4 s of every in-process test server's stop). These servers poll once a minute, so a lost wake shows as
a stall far past every bound here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, item_pb2, run_pb2, target_pb2
from tests.conftest import make_settings
from tests.helpers import exact, keyed_channel, until, watch_all

POLL_S = 60.0  # what a lost wake costs; each bound below is a small fraction of it
BOUND_S = 15.0


def held(claim: Callable[[int], Awaitable[Any]], until: Callable[[], Awaitable[object]]) -> Callable[..., Any]:
    """`claim`, each call of which, once it has read, waits for `until()` before answering: the wake the
    test sends meanwhile arrives while the loop is inside its claim."""

    async def claim_then_wait(room: int) -> Any:
        claimed = await claim(room)
        await until()
        return claimed

    return claim_then_wait


async def test_a_run_created_while_the_executor_claims_starts_without_waiting_a_poll(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, poll_interval_s=POLL_S))
    await srv.start()
    claiming, created = asyncio.Event(), asyncio.Event()

    async def hold_until_created() -> None:
        claiming.set()
        await created.wait()

    srv.executor._claim = held(srv.executor._claim, hold_until_created)  # type: ignore[method-assign]
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            srv.executor.wake()  # a claim now, rather than at the next poll a minute away
            await asyncio.wait_for(claiming.wait(), BOUND_S)
            reply = await runs.CreateRun(
                pb.CreateRunRequest(
                    items=[item_pb2.Item(input="q", expected_output="a", response=item_pb2.Response(content="a"))],
                    target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                    graders=[exact()],
                )
            )
            created.set()  # the claim (which read before the run was committed) now answers: no jobs
            events = await asyncio.wait_for(watch_all(runs, reply.run.id), BOUND_S)
    finally:
        created.set()  # a claim held still (the test failed before it set it) would hold the stop up
        await srv.stop()
    assert events[-1].run.status == run_pb2.RUN_STATUS_SUCCEEDED, events[-1]


async def test_a_stop_while_the_loops_claim_does_not_wait_a_poll(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, poll_interval_s=POLL_S))
    await srv.start()
    sender = srv.webhook_sender
    holding: list[str] = []

    def hold_until_stopping(name: str, owner: Any) -> Callable[[], Awaitable[object]]:
        async def hold() -> None:
            """Until the owner's stop has begun (and set the wake its loop looks at after the claim)."""
            holding.append(name)
            while not owner._stopping:
                await asyncio.sleep(0.01)

        return hold

    srv.executor._claim = held(srv.executor._claim, hold_until_stopping("executor", srv.executor))  # type: ignore[method-assign]
    sender._claim = held(sender._claim, hold_until_stopping("webhooks", sender))  # type: ignore[method-assign]
    try:
        srv.executor.wake()
        sender._wake.set()
        await until(lambda: sorted(holding) == ["executor", "webhooks"], BOUND_S)  # both loops inside a claim
    finally:
        stopping = asyncio.ensure_future(srv.stop())
        try:
            await asyncio.wait_for(asyncio.shield(stopping), BOUND_S)
        finally:  # failed: wake the loops by hand, so the server is stopped before the next test all the same
            srv.executor.wake()
            sender._wake.set()
            await stopping
