"""Liveness and fairness: no tenant, target or ordinary call stops or starves the engine for others.

Against the real server (SQLite, or PostgreSQL with EVALSVC_TEST_DB=postgres) and real HTTP webhooks
on 127.0.0.1 (`Webhook`: answers at once, slowly, with HTTP 500, or never):
- cancelling runs whose calls hang frees their endpoint and worker slots, and execution goes on;
- a run hung on its webhook, throttled by it, or queued for the grading processes does not delay
  other tenants' runs, nor its own tenant's other runs while the tenant's hung calls leave it room
  (--max-workers-per-tenant: a tenant whose hung calls fill it waits for them, by design);
- supervised loops survive failures and stray cancellations; the watchdog turns health NOT_SERVING
  while a loop is stuck with work waiting, and SERVING again once it moves;
- a seeded random interleaving of a few hundred operations (create, cancel, delete, undelete, update,
  watch, disconnect) over several tenants and target kinds leaves every run that was not cancelled
  finished within a bound, and the executor still claiming; another, with tenants passing their
  stored bytes and budgets (a run over its bytes waits for its calls under way), leaves every run ended,
  each over its bytes with a result for every call made. The seed is printed; replay a failure with
  EVALSVC_LIVENESS_SEED=<seed> (EVALSVC_LIVENESS_OPS=<n> sets the number of operations).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc import liveness
from evalsvc.execution import executor as executor_module
from evalsvc.execution.fairness import RoundRobin, even_split
from evalsvc.metrics import Metrics
from evalsvc.server import EvalServer
from evalsvc.slots import Hold, Slots
from evalsvc.statuses import TERMINAL
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import dataset_service_pb2_grpc, eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests import dbs
from tests.conftest import make_settings
from tests.helpers import keyed_channel, until
from tests.procs import start_server
from tests.test_targets_judges import PRICES
from tests.test_tenant_caps import assert_over

BIG_ANSWER = 5_000  # what a webhook's answers under /big/ are padded with
HUNG_CALL_TIMEOUT_S = 600  # the longest a target call may take: hung calls last until cancelled
RunStub = eval_run_service_pb2_grpc.EvalRunServiceStub
StubsT = TypeVar("StubsT")


# ------------------------------------------------------------------------------------------ webhooks


class Webhook:
    """An agent webhook on 127.0.0.1, served from the test's event loop (HTTP/1.1, keep-alive).

    POST /fast answers at once, /slow after `slow_s`, /fail with HTTP 500, /throttle with HTTP 429 and
    `Retry-After: 30`, /hang never (until the webhook closes), /hang-some never for an item whose input
    ends in a multiple of 10 and at once for the others, /retry-then-hang an item's first call with
    HTTP 503 and `Retry-After: 1` and its next never, /gated/... when the test lets it
    (`answer_one`). An answer's `content` is the item's input, so an exact-match grader passes; a path
    ending in /chat/completions is an LLM judge's, answered with a criteria verdict that passes, unless it
    starts with /paid/: a chat target's, answered with its last message and a usage of PAID_TOKENS prompt
    tokens (what the price table makes a call cost). A path under /big/ is answered as the path without
    it, its content padded with BIG_ANSWER characters. `inputs` holds each request's item input (or last
    message), in arrival order: which items a run's calls were for."""

    def __init__(self, slow_s: float = 0.1) -> None:
        self.slow_s = slow_s
        self.calls: Counter[str] = Counter()
        self.arrived: list[str] = []  # the paths of the requests, in arrival order
        self.inputs: list[str] = []  # what each request asked about, in arrival order
        self.answered: list[str] = []  # the paths of the requests answered, in order
        self._answers_allowed = 0  # to /gated requests
        self._retried: set[str] = set()  # items /retry-then-hang told to come back (their next call hangs)
        self._arrived = asyncio.Condition()
        self._closing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Webhook:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        async with self._arrived:
            self._arrived.notify_all()  # gated requests end too
        assert self._server is not None
        self._server.close()

    async def wait_until(self, check: Callable[[], bool], within_s: float = 15.0) -> None:
        """Until `check` (of the requests arrived and answered) holds."""

        async def holds() -> None:
            async with self._arrived:
                await self._arrived.wait_for(check)

        await asyncio.wait_for(holds(), within_s)

    async def wait_for_calls(self, path: str, n: int, within_s: float = 15.0) -> None:
        """Until `n` requests to `path` have arrived."""
        await self.wait_until(lambda: self.calls[path] >= n, within_s)

    async def answer_one(self) -> None:
        """Let one request waiting on a /gated path be answered, and wait until it has been."""
        async with self._arrived:
            goal = len(self.answered) + 1
            self._answers_allowed += 1
            self._arrived.notify_all()
        await self.wait_until(lambda: len(self.answered) >= goal)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self._closing.is_set():
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                path = head.split(" ", 2)[1]
                length = next(
                    (
                        int(v)
                        for k, _, v in (h.partition(":") for h in head.split("\r\n"))
                        if k.lower() == "content-length"
                    ),
                    0,
                )
                request = json.loads(await reader.readexactly(length) or b"null")
                asked = _asked(request)
                async with self._arrived:
                    self.calls[path] += 1
                    self.arrived.append(path)
                    self.inputs.append(asked)
                    self._arrived.notify_all()
                content = asked
                if path.startswith("/big/"):
                    path, content = path.removeprefix("/big"), asked + " " + "z" * BIG_ANSWER
                if (
                    path == "/hang"
                    or (path == "/retry-then-hang" and request["item"]["input"] in self._retried)
                    or (path == "/hang-some" and int(asked.rsplit(" ", 1)[-1]) % 10 == 0)
                ):
                    await self._closing.wait()
                    return
                if path == "/retry-then-hang":
                    self._retried.add(request["item"]["input"])
                if path == "/slow":
                    await asyncio.sleep(self.slow_s)
                if path.startswith("/gated/"):
                    async with self._arrived:
                        await self._arrived.wait_for(lambda: self._answers_allowed > 0 or self._closing.is_set())
                        if self._closing.is_set():
                            return
                        self._answers_allowed -= 1
                status = {
                    "/fail": "500 Internal Server Error",
                    "/throttle": "429 Too Many Requests",
                    "/retry-then-hang": "503 Service Unavailable",
                }.get(path, "200 OK")
                if path.startswith("/paid/"):
                    body = json.dumps(
                        {
                            "choices": [{"message": {"role": "assistant", "content": content}}],
                            "usage": {"prompt_tokens": PAID_TOKENS, "completion_tokens": 0},
                        }
                    ).encode()
                elif path.endswith("/chat/completions"):
                    verdict = json.dumps({"passed": True, "reason": "ok"})
                    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
                else:
                    body = json.dumps({"content": content}).encode()
                head_out = (
                    f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    + ("retry-after: 30\r\n" if path == "/throttle" else "")
                    + ("retry-after: 1\r\n" if path == "/retry-then-hang" else "")
                    + "\r\n"
                )
                writer.write(head_out.encode() + body)
                await writer.drain()
                async with self._arrived:
                    self.answered.append(path)
                    self._arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection, or gave up on the call
        finally:
            writer.close()


def _asked(request: Any) -> str:
    """What a request asks about: a chat call's last message, a webhook call's item input ("" for neither)."""
    if not isinstance(request, dict):
        return ""
    if request.get("messages"):
        return str(request["messages"][-1].get("content"))
    return str((request.get("item") or {}).get("input", ""))


# ------------------------------------------------------------------------------------------ requests


def webhook(url: str) -> target_pb2.Target:
    return target_pb2.Target(
        http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=url, timeout_s=HUNG_CALL_TIMEOUT_S))
    )


def echo() -> target_pb2.Target:
    return target_pb2.Target(echo=target_pb2.EchoTarget())


def recorded() -> target_pb2.Target:
    return target_pb2.Target(provided=target_pb2.ProvidedTarget())


def run_request(target: target_pb2.Target, n: int, ask: str = "q {}") -> pb.CreateRunRequest:
    """n items (i0, i1, ...) whose input is `ask` with the index in it, and whose expected output is their
    input (and, for recorded targets, their response)."""
    asks = [ask.format(i) for i in range(n)]
    items = [
        item_pb2.Item(id=f"i{i}", input=q, expected_output=q, response=item_pb2.Response(content=q))
        for i, q in enumerate(asks)
    ]
    return pb.CreateRunRequest(
        items=items, target=target, graders=[grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())]
    )


async def finish(stub: RunStub, run_id: str, within_s: float) -> run_pb2.Run:
    """The run's terminal state, watched to its end; fails when that takes longer than within_s."""

    async def to_end() -> run_pb2.Run:
        async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id)):
            if event.HasField("run") and event.run.status in TERMINAL:
                return event.run
        raise AssertionError(f"the watch of {run_id} ended without a terminal event")

    return await asyncio.wait_for(to_end(), within_s)


async def create_and_finish(stub: RunStub, request: pb.CreateRunRequest, within_s: float) -> run_pb2.Run:
    """Create a run and watch it to its end, all within `within_s` (measured from before CreateRun)."""

    async def both() -> run_pb2.Run:
        created = await stub.CreateRun(request)
        return await finish(stub, created.run.id, within_s)

    return await asyncio.wait_for(both(), within_s)


# ------------------------------------------------------------------------------------------ servers


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **overrides: object) -> AsyncIterator[EvalServer]:
    """A started server that may call 127.0.0.1, with quick retries and no CreateRun rate limit in the way."""
    values: dict[str, object] = {"outbound_allow": "127.0.0.1", "create_run_rate": 1000.0, "create_run_burst": 1000}
    values.update(overrides)
    srv = EvalServer(make_settings(tmp_path, **values))
    srv.outbound.base_backoff_s = 0.01  # a failing webhook gives up in milliseconds; same retry shape
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


@contextlib.asynccontextmanager
async def tenants_on(
    srv: EvalServer, on: Callable[[grpc.aio.Channel], StubsT], *names: str
) -> AsyncIterator[dict[str, StubsT]]:
    """`on(channel)` per tenant (its stubs), each on its own channel with its own API key."""
    async with contextlib.AsyncExitStack() as stack:
        stubs = {}
        for name in names:
            key, _ = await srv.keys.create(name)
            stubs[name] = on(await stack.enter_async_context(keyed_channel(srv.port, key)))
        yield stubs


def tenants(srv: EvalServer, *names: str) -> contextlib.AbstractAsyncContextManager[dict[str, RunStub]]:
    """A run stub per tenant, each on its own channel with its own API key."""
    return tenants_on(srv, RunStub, *names)


def restarts(srv: EvalServer, loop: str) -> float:
    return srv.metrics.registry.get_sample_value("evalsvc_loop_restarts_total", {"loop": loop}) or 0.0


# ------------------------------------------------------------------------------------------ cancellation


async def test_cancelled_hung_calls_give_their_endpoint_slots_to_the_next_run(tmp_path: Path) -> None:
    """Regression: cancelling in-flight calls leaked their endpoint slots, so every later call to that
    host - any tenant's - waited forever."""
    async with serving(tmp_path) as srv, Webhook() as hook, tenants(srv, "a", "b") as t:
        hanging = 0
        for round_ in range(3):
            slots = srv.outbound.limit_of(hook.url).slots
            # The endpoint's whole limit is taken; once B has used the endpoint too, A's half of it.
            hanging += slots.capacity if round_ == 0 else slots.share()
            hung = (await t["a"].CreateRun(run_request(webhook(hook.url + "/hang"), 20))).run
            await hook.wait_for_calls("/hang", hanging)
            await t["a"].CancelRun(pb.CancelRunRequest(run_id=hung.id))
            for stub in t.values():
                run = await create_and_finish(stub, run_request(webhook(hook.url + "/fast"), 5), within_s=10)
                assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == 5
        assert srv.outbound.limit_of(hook.url).in_flight == 0
        assert srv.executor.in_flight() == 0


@pytest.mark.parametrize("how", ["CancelRun", "DeleteRun"])
async def test_cancel_while_the_run_is_being_loaded_does_not_stop_execution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Regression: a cancel cancelled the shared plan-loading task while the claim loop awaited it
    (through asyncio.shield); the CancelledError ended the claim loop and no run of any tenant ran again."""
    loading, loaded = asyncio.Event(), asyncio.Event()

    async with serving(tmp_path) as srv, Webhook() as hook, tenants(srv, "a", "b") as t:
        real_build = srv.executor._build_plan  # every plan is built here, read back or handed over

        async def slow_build(*args: Any) -> Any:
            loading.set()
            await loaded.wait()
            return await real_build(*args)

        monkeypatch.setattr(srv.executor, "_build_plan", slow_build)
        victim = (await t["a"].CreateRun(run_request(webhook(hook.url + "/slow"), 3))).run
        await asyncio.wait_for(loading.wait(), 10)  # the claim loop waits for the victim's plan
        if how == "CancelRun":
            await t["a"].CancelRun(pb.CancelRunRequest(run_id=victim.id))
        else:
            await t["a"].DeleteRun(pb.DeleteRunRequest(run_id=victim.id))
        monkeypatch.setattr(srv.executor, "_build_plan", real_build)
        loaded.set()
        for stub in t.values():
            run = await create_and_finish(stub, run_request(echo(), 3), within_s=10)
            assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
            run = await create_and_finish(stub, run_request(webhook(hook.url + "/fast"), 3), within_s=10)
            assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert restarts(srv, "claim") == 0 and restarts(srv, "record") == 0


async def test_the_plan_sweep_ends_the_work_and_plans_of_runs_that_ended_unannounced(tmp_path: Path) -> None:
    """A run's end missed by the executor (a notification lost while the listener reconnected) is found by
    its periodic sweep: the run's calls are cancelled and its plan forgotten; an active run's plan stays."""
    async with serving(tmp_path) as srv, Webhook() as hook, tenants(srv, "a") as t:
        executor = srv.executor
        hung = (await t["a"].CreateRun(run_request(webhook(hook.url + "/hang"), 2))).run
        await hook.wait_until(lambda: executor.in_flight() == 2)
        done = await create_and_finish(t["a"], run_request(echo(), 2), within_s=10)
        assert done.id not in executor._plans  # forgotten when its recording finished it
        executor._plans[done.id] = executor._plans[hung.id]  # as if its end had gone unheard

        await executor.sweep_plans()
        assert done.id not in executor._plans and hung.id in executor._plans and executor.in_flight() == 2

        srv.runs._on_cancelled = lambda run_id: None  # the executor does not hear of this cancel
        await t["a"].CancelRun(pb.CancelRunRequest(run_id=hung.id))
        await executor.sweep_plans()
        assert hung.id not in executor._plans
        for _ in range(100):  # the cancelled calls end within a few turns of the loop
            if executor.in_flight() == 0:
                break
            await asyncio.sleep(0.01)
        assert executor.in_flight() == 0


async def test_runs_whose_handed_over_plans_were_dropped_are_read_back_and_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateRun hands a run's plan inputs to the local executor, bounded in items. Runs created while
    the executor is busy beyond that bound lose their inputs, oldest first, and are read back from the
    database when claimed: every one of them still runs to its end."""
    monkeypatch.setattr(executor_module, "MAX_CREATED_ITEMS", 4)
    building, go_on = asyncio.Event(), asyncio.Event()
    async with serving(tmp_path) as srv, tenants(srv, "a") as t:
        real_build, real_load = srv.executor._build_plan, srv.executor._load_plan
        read_back: list[str] = []

        async def held_build(*args: Any) -> Any:
            building.set()
            await go_on.wait()
            return await real_build(*args)

        async def counted_load(run_id: str) -> Any:
            read_back.append(run_id)
            return await real_load(run_id)

        monkeypatch.setattr(srv.executor, "_build_plan", held_build)
        monkeypatch.setattr(srv.executor, "_load_plan", counted_load)
        first = (await t["a"].CreateRun(run_request(echo(), 3))).run.id
        await asyncio.wait_for(building.wait(), 10)  # the claim loop waits for the first run's plan
        later = [(await t["a"].CreateRun(run_request(echo(), 3))).run.id for _ in range(3)]
        assert srv.executor._created_items <= 4
        go_on.set()
        runs = [await finish(t["a"], run_id, within_s=20) for run_id in [first, *later]]
    assert [run.status for run in runs] == [run_pb2.RUN_STATUS_SUCCEEDED] * 4
    assert set(later[:2]) <= set(read_back), "the oldest handed-over inputs were dropped and read back"
    assert first not in read_back and later[-1] not in read_back


async def test_an_api_only_server_keeps_no_plan_inputs_of_the_runs_it_creates(tmp_path: Path) -> None:
    """With --workers 0 (an API-only replica) another process executes the runs this one creates, so
    holding their handed-over inputs would only cost memory until the bound pushed them out."""
    async with serving(tmp_path, workers=0) as srv, tenants(srv, "a") as t:
        for _ in range(3):
            await t["a"].CreateRun(run_request(echo(), 3))
        assert srv.executor._created == {} and srv.executor._created_items == 0


async def test_jobs_claimed_just_before_their_run_is_cancelled_never_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that commits just before a cancel, and is turned into tasks just after it, starts none
    of the cancelled run's jobs (they used to call the target anyway, holding its slots while it hung)."""
    async with serving(tmp_path) as srv, Webhook() as hook, tenants(srv, "a") as t:
        claimed, go_on = asyncio.Event(), asyncio.Event()
        classify = srv.executor._all_local  # the claim loop's next step after a claim commits

        async def paused(jobs: list[Any]) -> bool:
            claimed.set()
            await go_on.wait()
            return await classify(jobs)

        monkeypatch.setattr(srv.executor, "_all_local", paused)
        run = (await t["a"].CreateRun(run_request(webhook(hook.url + "/hang"), 5))).run
        await asyncio.wait_for(claimed.wait(), 10)
        await t["a"].CancelRun(pb.CancelRunRequest(run_id=run.id))
        monkeypatch.setattr(srv.executor, "_all_local", classify)
        go_on.set()
        after = await create_and_finish(t["a"], run_request(webhook(hook.url + "/fast"), 5), within_s=10)
        assert after.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert hook.calls["/hang"] == 0
        assert srv.outbound.limit_of(hook.url).in_flight == 0 and srv.executor.in_flight() == 0


async def test_jobs_whose_run_ends_before_their_tasks_start_give_back_their_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job task cancelled before its first step (its run ended - a cancel, a delete, another replica's
    notice - in the turn its claim's tasks were made) never ran `_run_job`'s `finally`: its share of the
    claim was never given back, so the claim's id was renewed with every lease for good, one more claim
    per such job, until the renewal outgrew PostgreSQL's 32,767 parameters and the leases loop failed.
    Here the run's end comes exactly in that window: as each of its tasks is recorded in flight."""
    async with serving(tmp_path) as srv, Webhook() as hook, tenants(srv, "a") as t:
        executor = srv.executor
        ends: list[str] = []

        class EndsOnArrival(set[Any]):
            def __init__(self, run_id: str) -> None:
                super().__init__()
                self.run_id = run_id

            def add(self, task: Any) -> None:
                super().add(task)
                ends.append(self.run_id)
                executor.run_ended(self.run_id)  # before the task's first step

        class InFlight(dict[str, set[Any]]):
            def __missing__(self, run_id: str) -> set[Any]:
                tasks = self[run_id] = EndsOnArrival(run_id)
                return tasks

        monkeypatch.setattr(executor, "_in_flight", InFlight())
        run = (await t["a"].CreateRun(run_request(webhook(hook.url + "/hang"), 5))).run
        await until(lambda: len(ends) == 5)
        monkeypatch.setattr(executor, "_in_flight", defaultdict(set))
        await t["a"].CancelRun(pb.CancelRunRequest(run_id=run.id))
        await until(lambda: not executor._open_claims)  # failed: the claim of 5 stayed open for good
        assert hook.calls["/hang"] == 0 and executor.in_flight() == 0
        after = await create_and_finish(t["a"], run_request(webhook(hook.url + "/fast"), 5), within_s=10)
        assert after.status == run_pb2.RUN_STATUS_SUCCEEDED and not executor._open_claims


# ------------------------------------------------------------------------------------------ fairness


async def test_a_run_hung_on_its_webhook_delays_no_other_run(tmp_path: Path) -> None:
    """The issue's figures: with tenant A's 300-item run hung on a webhook, B's 1-item echo run ends
    within 1 s, B's 20-item run against a fast webhook within 5 s, and A's own second small run within 5 s."""
    async with (
        serving(tmp_path) as srv,
        Webhook() as hung_hook,
        Webhook() as fast_hook,
        tenants(srv, "a", "b") as t,
    ):
        a, b = t["a"], t["b"]
        stuck = (await a.CreateRun(run_request(webhook(hung_hook.url + "/hang"), 300))).run
        await hung_hook.wait_for_calls("/hang", 8)  # its endpoint's limit is taken; the rest queue for it

        figures = {}
        for name, stub, request, bound_s in (
            ("B, 1 item, echo", b, run_request(echo(), 1), 1.0),
            ("B, 20 items, fast webhook", b, run_request(webhook(fast_hook.url + "/fast"), 20), 5.0),
            ("A's second run, 5 items, fast webhook", a, run_request(webhook(fast_hook.url + "/fast"), 5), 5.0),
        ):
            started = time.monotonic()
            run = await create_and_finish(stub, request, within_s=bound_s)
            figures[name] = f"{time.monotonic() - started:.3f} s"
            assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == len(request.items)
        print(f"with A's 300-item run hung, create to end: {figures}")

        still = (await a.GetRun(pb.GetRunRequest(run_id=stuck.id))).run
        assert still.status == run_pb2.RUN_STATUS_RUNNING and still.counts.completed_evaluations == 0
        assert hung_hook.calls["/hang"] == 8
        # Its first claim took 64 jobs (--workers): 8 hold workers in hung calls, the rest queue for the
        # endpoint without one, and the run leases nothing more while they do.
        sample = srv.metrics.registry.get_sample_value
        assert (sample("evalsvc_jobs_running"), sample("evalsvc_jobs_held_up")) == (8, 56)
        await a.CancelRun(pb.CancelRunRequest(run_id=stuck.id))


async def test_one_tenants_hung_endpoints_leave_the_other_workers_to_other_tenants(tmp_path: Path) -> None:
    """Regression (probe): tenant A's runs on 8 hung endpoints held all 64 workers (each endpoint its
    limit of 8), so nothing was claimed for anyone until A's calls timed out: B's 1-item run took 57 s
    instead of 0.1 s. A tenant has at most --max-workers-per-tenant calls in progress (half of --workers
    by default): here 4 of 8; its other jobs wait for room holding no worker."""
    async with (
        serving(tmp_path, workers=8) as srv,
        Webhook() as first_hung,
        Webhook() as second_hung,
        Webhook() as fast_hook,
        tenants(srv, "a", "b") as t,
    ):
        a, b = t["a"], t["b"]
        first = (await a.CreateRun(run_request(webhook(first_hung.url + "/hang"), 20))).run
        await first_hung.wait_for_calls("/hang", 4)
        second = (await a.CreateRun(run_request(webhook(second_hung.url + "/hang"), 20))).run
        for request, bound_s in (
            (run_request(echo(), 1), 5.0),
            (run_request(webhook(fast_hook.url + "/fast"), 10), 10.0),
        ):
            run = await create_and_finish(b, request, within_s=bound_s)
            assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == len(request.items)
        assert (first_hung.calls["/hang"], second_hung.calls["/hang"]) == (4, 0)  # A's share, no more
        assert srv.metrics.registry.get_sample_value("evalsvc_jobs_running") == 4
        for run in (first, second):
            await a.CancelRun(pb.CancelRunRequest(run_id=run.id))


async def test_jobs_back_from_a_wait_do_not_take_a_tenant_past_its_share(tmp_path: Path) -> None:
    """Regression (review): the share was counted when jobs were claimed, and jobs held up meanwhile
    (backing off before a retry, waiting for DNS or an endpoint) did not count: A's jobs told to come
    back in 1 s by a 503, plus another run of A's claimed meanwhile, all ended in hung calls, A held all
    8 workers and B's run was not claimed. The bound is on calls in progress, taken as a call starts."""
    async with (
        serving(tmp_path, workers=8) as srv,
        Webhook() as retry_then_hang,
        Webhook() as hung,
        Webhook() as fast_hook,
        tenants(srv, "a", "b") as t,
    ):
        a, b = t["a"], t["b"]
        first = (await a.CreateRun(run_request(webhook(retry_then_hang.url + "/retry-then-hang"), 4))).run
        await retry_then_hang.wait_for_calls("/retry-then-hang", 4)  # each answered 503, Retry-After: 1
        second = (await a.CreateRun(run_request(webhook(hung.url + "/hang"), 4))).run
        await hung.wait_for_calls("/hang", 4)  # A's 4 calls in progress: its share
        await asyncio.sleep(1.5)  # the 1 s the endpoint asked for is over: the first run's jobs are back
        run = await create_and_finish(b, run_request(webhook(fast_hook.url + "/fast"), 10), within_s=10.0)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == 10
        assert retry_then_hang.calls["/retry-then-hang"] == 4  # the retries found no room: none is calling
        assert srv.metrics.registry.get_sample_value("evalsvc_jobs_running") == 4
        for each in (first, second):
            await a.CancelRun(pb.CancelRunRequest(run_id=each.id))


def endpoint_calls(url: str, n: int, *, by: str, tag: str) -> pb.CreateRunRequest:
    """n items that call the endpoint at `url` once each: as their target (an agent's webhook), or as
    the LLM judge grading an echo target's output. `tag` names the run in the paths it calls."""
    if by == "target":
        request = run_request(webhook(f"{url}/gated/{tag}/agent"), n)
    else:
        request = run_request(echo(), n)
        endpoint = target_pb2.Endpoint(base_url=f"{url}/gated/{tag}/v1", timeout_s=HUNG_CALL_TIMEOUT_S)
        judge = grader_pb2.LlmJudge(
            model="judge", endpoint=endpoint, mode=grader_pb2.LlmJudge.MODE_CRITERIA, criteria="answers"
        )
        del request.graders[:]
        request.graders.append(grader_pb2.Grader(name="judge", llm_judge=judge))
    return request


@pytest.mark.parametrize("by", ["target", "judge"])
async def test_waiting_for_an_endpoint_is_fair_across_tenants(tmp_path: Path, by: str) -> None:
    """Regression: every tenant's calls to an endpoint waited for its slots in one first-come-first-served
    queue, so tenant B's one call waited for tenant A's whole backlog there (13 s instead of 1.5 s).

    A's 40 calls (by its target, or by its LLM judge: a judge's calls wait in the turn of the tenant
    whose run it grades) take the endpoint's 2 slots, alone, and queue for the rest; then B's one call
    comes. What A holds beyond its share (1 of 2) is lent to B: B's call reaches the endpoint at once,
    queued behind none of A's (it used to wait for a freed slot; on a hanging endpoint, for A's
    timeout). The endpoint answers one call at a time, when the test says: B's run ends while A has had
    at most 4 calls answered, not after all 40."""
    backlog, slots = 40, 2
    # A may hold every worker (its 40 jobs are claimed at once); the turns at the endpoint are what is tested.
    async with serving(tmp_path, max_workers_per_tenant=64) as srv, Webhook() as hook, tenants(srv, "a", "b") as t:
        limit = srv.outbound.limit_of(hook.url)  # the endpoint's limit, shared by both tenants
        limit.limit = limit.minimum = limit.maximum = float(slots)  # no growth on success: 2 slots
        limit.slots.set_capacity(slots)
        a_run = (await t["a"].CreateRun(endpoint_calls(hook.url, backlog, by=by, tag="a"))).run
        await until(lambda: limit.in_flight == slots and limit.slots.waiting == backlog - slots)
        b_run = (await t["b"].CreateRun(endpoint_calls(hook.url, 1, by=by, tag="b"))).run
        await hook.wait_until(lambda: any(path.startswith("/gated/b/") for path in hook.arrived))
        assert limit.slots.waiting == backlog - slots  # B's call waited behind none of A's
        b_done = asyncio.create_task(finish(t["b"], b_run.id, within_s=60))

        def answered(tag: str) -> int:
            return sum(path.startswith(f"/gated/{tag}/") for path in hook.answered)

        while not answered("b") and len(hook.answered) < backlog + 1:
            await hook.answer_one()
            if answered("b"):
                break  # B used the endpoint just now: A keeps to its share, and the freed slot stays free
            # Its slot has gone to the next call in turn, which has reached the endpoint.
            await hook.wait_until(lambda: len(hook.arrived) >= min(len(hook.answered) + slots, backlog + 1))
        b_end = await b_done  # nothing more is answered meanwhile: A stays where it is
        a_now = (await t["a"].GetRun(pb.GetRunRequest(run_id=a_run.id))).run
        order = "".join(path.split("/")[2] for path in hook.arrived)  # "aab...": whose calls, as they came
        print(f"calls reaching the endpoint, by tenant: {order}")
        assert b_end.status == run_pb2.RUN_STATUS_SUCCEEDED and b_end.counts.passed == 1
        assert answered("a") <= 4, f"B's call was answered after {answered('a')} of A's {backlog}: {order}"
        assert a_now.status == run_pb2.RUN_STATUS_RUNNING and a_now.counts.completed_evaluations <= 4
        assert order.index("b") == slots, order  # B's call came right after the two A took alone

        await t["a"].CancelRun(pb.CancelRunRequest(run_id=a_run.id))
        await until(lambda: limit.in_flight == 0 and limit.slots.waiting == 0)  # nothing leaked


async def test_a_run_backing_off_from_a_throttling_endpoint_holds_no_workers(tmp_path: Path) -> None:
    """Jobs that sleep out a 429's Retry-After give their worker slots back: with every worker's job of
    tenant A backing off for 30 s, tenant B's runs still run at once (A may hold every worker here)."""
    async with (
        serving(tmp_path, workers=16, max_workers_per_tenant=16) as srv,
        Webhook() as throttling,
        Webhook() as fast_hook,
        tenants(srv, "a", "b") as t,
    ):
        a, b = t["a"], t["b"]
        throttled = (await a.CreateRun(run_request(webhook(throttling.url + "/throttle"), 100))).run
        await throttling.wait_for_calls("/throttle", 16)  # all 16 claimed jobs were told to come back in 30 s
        run = await create_and_finish(b, run_request(echo(), 1), within_s=1.0)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        run = await create_and_finish(b, run_request(webhook(fast_hook.url + "/fast"), 20), within_s=5.0)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == 20
        assert srv.metrics.registry.get_sample_value("evalsvc_jobs_held_up") == 16
        await a.CancelRun(pb.CancelRunRequest(run_id=throttled.id))


async def test_jobs_waiting_for_a_grading_process_hold_no_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenant A's big outputs queue for the grading processes; the jobs waiting there give their worker
    slots back, so tenant B's run does not wait behind them (A may hold every worker here)."""
    async with serving(tmp_path, max_workers_per_tenant=64) as srv, tenants(srv, "a", "b") as t:
        graded, grading_frees_up = asyncio.Event(), asyncio.Event()
        grade_in_process = srv.executor._grading.grade

        async def busy_grading_process(*args: Any) -> Any:  # as if every grading process were taken
            graded.set()
            await grading_frees_up.wait()
            return await grade_in_process(*args)

        monkeypatch.setattr(srv.executor._grading, "grade", busy_grading_process)
        big = run_request(recorded(), 100)
        # Similarity over 20 KB outputs is estimated at ~8 ms a grading: graded in a grading process.
        big.graders[0].CopyFrom(grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity()))
        for item in big.items:
            item.expected_output = item.response.content = item.input + "x" * 20_000
        waiting = (await t["a"].CreateRun(big)).run
        await asyncio.wait_for(graded.wait(), 10)

        run = await create_and_finish(t["b"], run_request(echo(), 1), within_s=1.0)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert srv.metrics.registry.get_sample_value("evalsvc_jobs_held_up") == 64  # one claim's worth
        grading_frees_up.set()
        run = await finish(t["a"], waiting.id, within_s=60)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == 100


def test_round_robin_splits_claims_across_tenants_then_runs_taking_turns() -> None:
    rr = RoundRobin()
    runs = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1")]
    assert rr.shares(runs, 8) == {"a1": 2, "a2": 1, "a3": 1, "b1": 4}  # tenants first, then runs
    assert rr.shares(runs, 8) == {"b1": 4, "a2": 2, "a3": 1, "a1": 1}  # the next claim: b first, a2 first
    # A claim smaller than the number of tenants serves each tenant in turn.
    firsts = [next(iter(rr.shares(runs, 1))) for _ in range(4)]
    assert sorted(run[0] for run in firsts) == ["a", "a", "b", "b"]
    assert rr.shares([], 5) == {} and rr.shares(runs, 0) == {}
    assert even_split(7, 3) == [3, 2, 2] and even_split(1, 3) == [1, 0, 0]


# ------------------------------------------------------------------------------------------ slots


async def test_slots_are_never_leaked_by_cancellation() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)  # let it queue
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.held, slots.waiting) == (1, 0)

    granted, next_in_line = asyncio.create_task(slots.acquire()), asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # the slot goes to `granted`...
    granted.cancel()  # ...which is cancelled before it resumes: the slot passes on, it is not lost
    with pytest.raises(asyncio.CancelledError):
        await granted
    await asyncio.wait_for(next_in_line, 1)
    assert (slots.held, slots.waiting) == (1, 0)

    hold = Hold(slots)
    taking = asyncio.create_task(hold.take())
    await asyncio.sleep(0)
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    hold.give_back()  # holds nothing: gives nothing back
    assert slots.held == 1


# ------------------------------------------------------------------------------------------ supervision


async def test_supervise_restarts_a_loop_until_shutdown_and_ends_on_its_own_cancellation() -> None:
    metrics, stopping, turns = Metrics(), asyncio.Event(), []

    async def body() -> None:
        turns.append(len(turns))
        if len(turns) == 1:
            raise RuntimeError("a database hiccup")
        if len(turns) == 2:
            raise asyncio.CancelledError  # meant for something the loop awaited, not for the loop
        if len(turns) == 3:
            return  # a loop that returns before shutdown is restarted too
        stopping.set()

    await asyncio.wait_for(liveness.supervise("unit", body, stopping, metrics), 10)
    assert turns == [0, 1, 2, 3]
    assert metrics.registry.get_sample_value("evalsvc_loop_restarts_total", {"loop": "unit"}) == 3

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(liveness.supervise("own", forever, asyncio.Event(), metrics))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert metrics.registry.get_sample_value("evalsvc_loop_restarts_total", {"loop": "own"}) == 0


# Where each loop's work fails: the loop's own step (not a function run inside the database writer,
# whose group retry could absorb a fault before the loop sees it).
FAULT_SITES = {"claim": "_claim", "record": "record", "leases": "_extend_leases"}


@pytest.mark.parametrize("loop", list(FAULT_SITES))
async def test_executor_loops_survive_failures_and_stray_cancellations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    """A failing claim, recording or lease renewal, or a CancelledError not meant for the loop, restarts
    the loop (logged with its name, counted) and the runs end; a batch that could not be recorded runs
    again once its leases expire."""
    faults: list[BaseException] = [RuntimeError("injected"), asyncio.CancelledError()]
    name = FAULT_SITES[loop]

    async with serving(tmp_path, lease_ttl_s=1.0) as srv, Webhook(slow_s=0.5) as hook, tenants(srv, "a") as t:
        owner: Any = executor_module if loop == "record" else srv.executor
        real = getattr(owner, name)

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if faults:
                raise faults.pop(0)
            return await real(*args, **kwargs)

        monkeypatch.setattr(owner, name, flaky)
        # Renewals happen only while jobs are in flight: 20 calls of 0.5 s, 8 at a time, outlast both faults.
        targets = [webhook(hook.url + "/slow")] if loop == "leases" else [echo(), recorded()]
        with caplog.at_level(logging.ERROR, logger="evalsvc.liveness"):
            for target in targets:
                run = await create_and_finish(t["a"], run_request(target, 20), within_s=30)
                assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == 20
        assert faults == []
        assert restarts(srv, loop) == 2
        assert sum(f"loop {loop}" in r.getMessage() and r.__dict__.get("loop") == loop for r in caplog.records) == 2


@pytest.mark.parametrize(("site", "at_call"), [("_all_local", 1), ("_execute", 5)])
async def test_a_stray_cancellation_while_a_claim_is_executed_inline_loses_none_of_its_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str, at_call: int
) -> None:
    """Recorded responses are executed on the claim loop itself, a claim at a time. A CancelledError not
    meant for it, while it looks at a claim's runs or in the middle of the claim, restarts the loop;
    the jobs it had executed are recorded and the rest run again once their leases expire. (The rest
    stayed leased for good before: their leases were renewed as if still worked on, and the run never
    ended.)"""
    async with serving(tmp_path, lease_ttl_s=1.0) as srv, tenants(srv, "a") as t:
        real = getattr(srv.executor, site)
        calls = 0

        async def interrupted_once(*args: Any, **kwargs: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == at_call:
                raise asyncio.CancelledError()
            return bool(await real(*args, **kwargs))

        monkeypatch.setattr(srv.executor, site, interrupted_once)
        run = await create_and_finish(t["a"], run_request(recorded(), 20), within_s=30)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED and run.counts.passed == 20
        assert restarts(srv, "claim") == 1


async def test_watchdog_reports_a_stalled_claim_loop_through_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, stall_s=0.5, poll_interval_s=0.1) as srv, tenants(srv, "a") as t:
        unstuck = asyncio.Event()
        real_claim = srv.executor._claim

        async def stuck_claim(limit: int) -> Any:
            await unstuck.wait()
            return await real_claim(limit)

        monkeypatch.setattr(srv.executor, "_claim", stuck_claim)
        async with keyed_channel(srv.port, "") as channel:
            statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            serving_ = health_pb2.HealthCheckResponse.SERVING
            assert (await asyncio.wait_for(statuses.read(), 5)).status == serving_
            run = (await t["a"].CreateRun(run_request(echo(), 2))).run  # work waits; the claim loop is stuck
            assert (await asyncio.wait_for(statuses.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            sample = srv.metrics.registry.get_sample_value
            assert sample("evalsvc_loop_stalls_total", {"loop": "claim"}) == 1
            assert sample("evalsvc_loop_stalled", {"loop": "claim"}) == 1
            assert sample("evalsvc_loop_stalled", {"loop": "record"}) == 0

            unstuck.set()
            assert (await asyncio.wait_for(statuses.read(), 10)).status == serving_
            assert (await finish(t["a"], run.id, within_s=10)).status == run_pb2.RUN_STATUS_SUCCEEDED
            assert sample("evalsvc_loop_stalled", {"loop": "claim"}) == 0
            statuses.cancel()


async def test_watchdog_reports_a_stuck_webhook_sender_through_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook sender's loop is watched like the others: stuck in a claim (any await that never
    returns) while deliveries are due, it turned health NOT_SERVING never (deliveries waited for good);
    now it does, and SERVING again once the loop moves and sends them."""
    from evalsvc.v1 import webhook_service_pb2 as wpb
    from evalsvc.v1 import webhook_service_pb2_grpc
    from tests.fake_llm import FakeEndpoint, Reply

    async with (
        serving(tmp_path, stall_s=0.5, poll_interval_s=0.1) as srv,
        contextlib.AsyncExitStack() as stack,
    ):
        key, _ = await srv.keys.create("a")
        mine = await stack.enter_async_context(keyed_channel(srv.port, key))
        sender = srv.webhook_sender
        unstuck = asyncio.Event()
        stack.callback(unstuck.set)  # the server's shutdown waits for the loop
        real_claim = sender._claim

        async def stuck_claim(room: int) -> int:
            await unstuck.wait()
            return await real_claim(room)

        with FakeEndpoint(Reply({})) as receiver:
            async with keyed_channel(srv.port, "") as channel:
                statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                serving_ = health_pb2.HealthCheckResponse.SERVING
                assert (await asyncio.wait_for(statuses.read(), 5)).status == serving_
                hooks = webhook_service_pb2_grpc.WebhookServiceStub(mine)
                await hooks.CreateWebhook(
                    wpb.CreateWebhookRequest(webhook=wpb.Webhook(url=receiver.url, event_types=["run.created"]))
                )
                monkeypatch.setattr(sender, "_claim", stuck_claim)
                sender._wake.set()
                await asyncio.sleep(0.3)  # the loop is in its stuck claim
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(mine)
                await runs.CreateRun(run_request(echo(), 1))  # a delivery is due; nothing sends it
                not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
                assert (await asyncio.wait_for(statuses.read(), 10)).status == not_serving
                sample = srv.metrics.registry.get_sample_value
                assert sample("evalsvc_loop_stalls_total", {"loop": "webhook-sender"}) == 1
                assert sample("evalsvc_loop_stalled", {"loop": "webhook-sender"}) == 1
                assert sample("evalsvc_loop_stalled", {"loop": "claim"}) == 0
                assert not receiver.seen

                unstuck.set()
                assert (await asyncio.wait_for(statuses.read(), 10)).status == serving_
                assert await asyncio.to_thread(receiver.wait_seen, 1, 10)
                assert sample("evalsvc_loop_stalled", {"loop": "webhook-sender"}) == 0
                statuses.cancel()


class FakeTime:
    """The clock the liveness module reads (its `time`), moved by the test; asyncio keeps the real one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_watchdog_checks_loops_side_by_side_and_a_has_work_that_never_answers_delays_no_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim loop's has_work reads the database: behind a lock it does not answer. Checked one after
    another, each loop waited up to its stall limit for that answer, and every report came about three
    stall limits late (a 30 s lock at the default was never reported). Loops are checked at once now,
    an answer is awaited a check interval, and work counts as waiting from when the loop was found silent."""
    clock = FakeTime()
    monkeypatch.setattr(liveness, "time", clock)
    reports: list[bool] = []

    async def on_health(healthy: bool) -> None:
        reports.append(healthy)

    async def never_answers() -> bool:
        await asyncio.Event().wait()
        return True

    async def always() -> bool:
        return True

    dog = liveness.Watchdog(Metrics(), on_health, check_s=0.05)
    blocked = liveness.Watched("claim", liveness.Progress(), never_answers, stall_s=30.0)
    busy = liveness.Watched("record", liveness.Progress(), always, stall_s=30.0)
    dog.watch(blocked)
    dog.watch(busy)
    try:
        clock.now += 31  # both silent past their limit, with work waiting (or no answer)
        await asyncio.wait_for(dog.check(), 10)  # not the 30 s a blocked answer was awaited
        assert reports == [] and not blocked.stalled and not busy.stalled
        clock.now += 30  # silent with work waiting for their limit: both reported, at the same check
        await asyncio.wait_for(dog.check(), 10)
        assert blocked.stalled and busy.stalled and reports == [False]
        blocked.progress.beat()
        busy.progress.beat()
        await asyncio.wait_for(dog.check(), 10)
        assert reports == [False, True]
    finally:
        if blocked.asking is not None:
            blocked.asking.cancel()


async def test_a_loop_that_fails_every_turn_is_stalled_however_often_it_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim loop that fails at once every time (a full disk) and is restarted: it beat as it restarted,
    so health stayed SERVING for as long as the disk was full. A loop beats only after a turn now."""
    monkeypatch.setattr(liveness, "FIRST_BACKOFF_S", 0.02)  # restarted far more often than --stall-s
    monkeypatch.setattr(liveness, "MAX_BACKOFF_S", 0.02)
    async with serving(tmp_path, stall_s=0.5, poll_interval_s=0.1) as srv, tenants(srv, "a") as t:
        disk_full = asyncio.Event()
        disk_full.set()
        real_claim = srv.executor._claim

        async def claim(limit: int) -> Any:
            if disk_full.is_set():
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real_claim(limit)

        monkeypatch.setattr(srv.executor, "_claim", claim)
        async with keyed_channel(srv.port, "") as channel:
            statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            serving_ = health_pb2.HealthCheckResponse.SERVING
            assert (await asyncio.wait_for(statuses.read(), 5)).status == serving_
            run = (await t["a"].CreateRun(run_request(echo(), 2))).run
            assert (await asyncio.wait_for(statuses.read(), 15)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert restarts(srv, "claim") > 2
            disk_full.clear()
            assert (await asyncio.wait_for(statuses.read(), 15)).status == serving_
            assert (await finish(t["a"], run.id, within_s=15)).status == run_pb2.RUN_STATUS_SUCCEEDED
            statuses.cancel()


async def test_watchdog_does_not_flag_a_claim_loop_that_waits_for_free_workers(tmp_path: Path) -> None:
    """Jobs stay claimable for longer than --stall-s because every worker is busy: that is load, not a stall."""
    async with (
        serving(tmp_path, stall_s=0.5, poll_interval_s=0.1, workers=2) as srv,
        Webhook(slow_s=0.8) as hook,  # each call outlasts --stall-s
        tenants(srv, "a") as t,
    ):
        run = await create_and_finish(t["a"], run_request(webhook(hook.url + "/slow"), 6), within_s=20)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        await srv.watchdog.check()
        assert srv.watchdog.healthy
        for loop in ("claim", "record", "leases"):
            assert srv.metrics.registry.get_sample_value("evalsvc_loop_stalls_total", {"loop": loop}) == 0


async def test_watchdog_does_not_flag_a_claim_loop_that_executes_a_long_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded responses are graded on the claim loop, a claim at a time. A claim whose grading takes
    longer than --stall-s, while the run's next jobs wait to be claimed, is work, not a stall: health
    stayed SERVING only while a claim took less than --stall-s (a claim of many jobs with many graders
    takes seconds)."""
    async with serving(tmp_path, stall_s=0.5, poll_interval_s=0.1, claim_batch=200) as srv, tenants(srv, "a") as t:
        real_execute = srv.executor._execute

        async def slow_to_grade(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.01)  # grading is CPU on the event loop: this stands in for a job's
            return await real_execute(*args, **kwargs)

        monkeypatch.setattr(srv.executor, "_execute", slow_to_grade)
        # Claimed 200 at a time: each claim grades for ~2 s while the next jobs wait (the watchdog calls a
        # loop stuck after twice --stall-s: silent for it, then silent with work waiting for it).
        run = await create_and_finish(t["a"], run_request(recorded(), 400), within_s=30)
        assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert srv.metrics.registry.get_sample_value("evalsvc_loop_stalls_total", {"loop": "claim"}) == 0
        assert srv.watchdog.healthy


async def test_shutdown_does_not_wait_for_a_claim_it_grades_inline_and_hands_the_rest_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server told to stop while it grades a large claim of recorded responses stops grading it: what
    it graded is recorded, the rest is queued again (not left leased until the leases expire), and the
    next server finishes the run with every evaluation recorded once. Before, shutdown waited for the
    whole claim to be graded, however long that took."""
    url = dbs.db_url(tmp_path)
    calls = after_stop = 0
    many_graded = asyncio.Event()
    async with serving(tmp_path, db=url, claim_batch=500) as srv, tenants(srv, "a") as t:
        real_execute = srv.executor._execute

        async def slow_to_grade(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls, after_stop
            calls += 1
            after_stop += srv.executor._stopping
            if calls == 100:  # into the second claim: the first is --workers (64) jobs, the second the rest
                many_graded.set()
            time.sleep(0.005)  # grading is CPU on the event loop: this stands in for a job's
            return await real_execute(*args, **kwargs)

        monkeypatch.setattr(srv.executor, "_execute", slow_to_grade)
        run = (await t["a"].CreateRun(run_request(recorded(), 500))).run
        await asyncio.wait_for(many_graded.wait(), 30)
    # `serving` stopped the server on leaving the block, with most of the claim still to grade.
    assert calls < 400 and after_stop == 0, f"{after_stop} of {calls} jobs were graded after the executor stopped"
    async with serving(tmp_path, db=url) as srv, tenants(srv, "a") as t:
        # The restarted server's tenant key is new; the run belongs to tenant "a" either way.
        ended = await finish(t["a"], run.id, within_s=20)  # leased jobs would wait for --lease-ttl-s (30 s)
        assert ended.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert ended.counts.completed_evaluations == ended.counts.passed == 500


async def test_shutdown_hands_back_the_claims_of_jobs_in_flight(tmp_path: Path) -> None:
    """A server stopped while every job of a claim waits on its model hands the claim back, queued, so
    the next server (or, on PostgreSQL, another replica) runs those jobs at once. The cancelled jobs
    gave up their shares of the claim as they ended, which left the claim out of the release: on
    PostgreSQL its jobs stayed leased until --lease-ttl-s (30 s) ran out."""
    url = dbs.db_url(tmp_path)
    async with Webhook() as hook:
        async with serving(tmp_path, db=url) as srv, tenants(srv, "a") as t:
            run = (await t["a"].CreateRun(run_request(webhook(hook.url + "/gated/calls"), 4))).run
            await hook.wait_for_calls("/gated/calls", 4)  # every job waits on the model as the server stops
        async with serving(tmp_path, db=url) as srv, tenants(srv, "a") as t:
            await hook.wait_for_calls("/gated/calls", 8, within_s=10)  # asked again at once: handed back
            for _ in range(8):  # the first server's 4 calls (their callers gone) wait first
                await hook.answer_one()
            ended = await finish(t["a"], run.id, within_s=10)
    assert ended.status == run_pb2.RUN_STATUS_SUCCEEDED and ended.counts.passed == 4


@pytest.mark.skipif((reason := dbs.postgres_unavailable()) is not None, reason=reason or "PostgreSQL is not reachable")
async def test_the_listener_survives_a_failure_and_relays_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PostgreSQL listener that brings other replicas' events to this one's watchers restarts after
    an unexpected failure: a watcher here still sees a run that another replica executes, to its end."""
    url = dbs.postgres_url(tmp_path, "replicas")
    watching = EvalServer(make_settings(tmp_path, db=url))
    assert watching.listener is not None
    listen = watching.listener._run
    faults = [RuntimeError("injected")]

    async def flaky_listen() -> None:
        if faults:
            raise faults.pop(0)
        await listen()

    async def claims_nothing(limit: int) -> list[Any]:
        return []

    monkeypatch.setattr(watching.listener, "_run", flaky_listen)
    monkeypatch.setattr(watching.executor, "_claim", claims_nothing)  # every job runs on the other replica
    await watching.start()
    executing = await start_server(url, tmp_path / "executing.log", "--poll-interval-s", "0.2")
    try:
        assert watching.bootstrap_key
        async with (
            keyed_channel(executing.port, watching.bootstrap_key) as there,
            keyed_channel(watching.port, watching.bootstrap_key) as here,
        ):
            run = (await RunStub(there).CreateRun(run_request(echo(), 50))).run
            ended = await finish(RunStub(here), run.id, within_s=20)
        assert ended.status == run_pb2.RUN_STATUS_SUCCEEDED
        assert faults == [] and restarts(watching, "listener") == 1
        # Where its watchers stood is forgotten with the run's last event (it was kept for good).
        assert run.id not in watching.listener._relayed
    finally:
        executing.terminate()
        await watching.stop(grace=0.5)


# ------------------------------------------------------------------------------------------ random interleaving

TENANTS = ("t0", "t1", "t2", "t3")
# Target kinds and how often a create picks them. Runs on the hung webhook end only by being cancelled.
KINDS = {"echo": 3, "recorded": 3, "slow": 3, "failing": 2, "hung": 1}
OPERATIONS = {"create": 34, "cancel": 10, "delete": 7, "undelete": 5, "update": 10, "watch": 20, "disconnect": 14}
# Every run not cancelled ends within this many seconds after the last operation (they take ~2 s).
BOUND_S = 45.0


@dataclass
class TrackedRun:
    tenant: str
    run_id: str
    kind: str
    items: int
    cancel_asked: bool = False  # CancelRun or DeleteRun was called (the run may have finished first)
    deleted: bool = False
    tag: str = ""  # what its items' inputs start with: which calls were its (`Webhook.inputs`)
    max_cost_usd: float | None = None


@dataclass
class Watcher:
    run: TrackedRun
    task: asyncio.Task[list[pb.WatchRunResponse]]
    disconnected: bool = False


async def _watch(stub: RunStub, run_id: str) -> list[pb.WatchRunResponse]:
    events = []
    async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id)):
        if not event.HasField("heartbeat"):
            events.append(event)
    return events


class Interleaving:
    """What the seeded random interleavings share: the seed (printed; EVALSVC_LIVENESS_SEED replays it,
    EVALSVC_LIVENESS_OPS sets the number of operations), the runs and watchers made so far, the
    operations on them every interleaving has (cancel, delete, undelete, watch, disconnect), and what is
    checked after the last one. Every choice is made from the history, never from timing: replayable."""

    def __init__(self, stubs: dict[str, RunStub], operations: int) -> None:
        self.seed = int(os.environ.get("EVALSVC_LIVENESS_SEED") or random.SystemRandom().randrange(2**32))
        self.operations = int(os.environ.get("EVALSVC_LIVENESS_OPS") or operations)
        print(f"liveness seed {self.seed}, {self.operations} operations: replay with EVALSVC_LIVENESS_SEED={self.seed}")
        self.rng = random.Random(self.seed)
        self.note = f"(replay with EVALSVC_LIVENESS_SEED={self.seed})"
        self.stubs = stubs
        self.runs: list[TrackedRun] = []
        self.watchers: list[Watcher] = []
        self.done: Counter[str] = Counter()

    def pick(self, weights: dict[str, int]) -> str:
        """The next operation; a create while there is no run to operate on."""
        op = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        return op if op == "create" or self.runs else "create"

    async def ok_or_finished(self, call: Any) -> None:
        try:
            await call
        except grpc.aio.AioRpcError as error:  # cancelling a run that finished meanwhile
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{error} {self.note}"

    async def shared(self, op: str) -> bool:
        """Do `op` if it is one of the operations every interleaving has; whether it was."""
        rng = self.rng
        if op in ("cancel", "delete"):
            run = rng.choice(self.runs)
            stub = self.stubs[run.tenant]
            run.cancel_asked = True
            if op == "cancel":
                await self.ok_or_finished(stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id)))
            else:
                await stub.DeleteRun(pb.DeleteRunRequest(run_id=run.run_id))
                run.deleted = True
        elif op == "undelete":
            deleted = [r for r in self.runs if r.deleted] or self.runs
            run = rng.choice(deleted)
            await self.stubs[run.tenant].UndeleteRun(pb.UndeleteRunRequest(run_id=run.run_id))
            run.deleted = False
        elif op == "watch":
            run = rng.choice(self.runs)
            self.watchers.append(Watcher(run, asyncio.create_task(_watch(self.stubs[run.tenant], run.run_id))))
        elif op == "disconnect":  # a client goes away (mid-stream, unless its run already ended)
            connected = [w for w in self.watchers if not w.disconnected]  # by history, not timing: replayable
            if connected:
                victim = rng.choice(connected)
                victim.task.cancel()
                victim.disconnected = True
        else:
            return False
        return True

    async def cancel_every(self, kind: str) -> None:
        """Cancel the runs of `kind` not cancelled yet (those on the hung webhook end only so)."""
        for run in self.runs:
            if run.kind == kind and not run.cancel_asked:
                run.cancel_asked = True
                await self.ok_or_finished(self.stubs[run.tenant].CancelRun(pb.CancelRunRequest(run_id=run.run_id)))

    async def all_end(self, runs: list[TrackedRun] | None = None) -> list[run_pb2.Run]:
        """Every run's (or every one of `runs`') terminal state, each watched to its end within BOUND_S;
        the runs not ended else."""
        runs = self.runs if runs is None else runs
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(finish(self.stubs[r.tenant], r.run_id, BOUND_S) for r in runs)), BOUND_S
            )
        except TimeoutError:
            stuck = []
            for r in runs:
                status = (await self.stubs[r.tenant].GetRun(pb.GetRunRequest(run_id=r.run_id))).run.status
                if status not in TERMINAL:
                    stuck.append((r.run_id, r.kind, run_pb2.RunStatus.Name(status)))
            raise AssertionError(f"runs not ended {BOUND_S} s after the last operation: {stuck} {self.note}") from None

    async def watchers_saw_every_event(self) -> None:
        """Every watcher still connected saw every event, in order, to the end."""
        for w in self.watchers:
            if w.disconnected:
                continue
            events = await asyncio.wait_for(w.task, BOUND_S)
            assert [e.seq for e in events] == list(range(1, len(events) + 1)), f"{w.run} {self.note}"
            assert events[-1].HasField("run") and events[-1].run.status in TERMINAL, f"{w.run} {self.note}"

    async def executor_let_go(self, srv: EvalServer) -> None:
        """Once the runs ended, the executor lets go of them: nothing waits for calls, no ending is left
        (the recorder ends a run over a limit, or forgets one cancelled meanwhile, when woken: by its last
        job with calls under way, however that job ended)."""
        executor = srv.executor
        try:
            await until(lambda: not executor._calling and not executor._over_limit, within_s=5)
        except TimeoutError:
            raise AssertionError(f"kept: {executor._calling} {executor._over_limit} {self.note}") from None

    def executor_idle_and_healthy(self, srv: EvalServer) -> None:
        """Nothing is left in flight, waited for or leased (no lease renewed for nothing), no loop restarted."""
        executor, note = srv.executor, self.note
        assert executor.in_flight() == 0 and not executor._open_claims, note
        assert not executor._calling and not executor._over_limit, f"{executor._calling} {executor._over_limit} {note}"
        for loop in ("claim", "record", "leases"):
            assert restarts(srv, loop) == 0, f"loop {loop} restarted {note}"
        assert srv.watchdog.healthy, note


async def test_random_interleaving_of_operations_leaves_every_run_live(tmp_path: Path) -> None:
    async with (
        serving(tmp_path, workers=16) as srv,
        Webhook(slow_s=0.1) as slow,
        Webhook() as failing,
        Webhook() as hung,
        tenants(srv, *TENANTS) as stubs,
    ):
        mix = Interleaving(stubs, operations=300)
        rng, note = mix.rng, mix.note
        targets = {
            "echo": echo,
            "recorded": recorded,
            "slow": lambda: webhook(slow.url + "/slow"),
            "failing": lambda: webhook(failing.url + "/fail"),
            "hung": lambda: webhook(hung.url + "/hang"),
        }

        for _ in range(mix.operations):
            op = mix.pick(OPERATIONS)
            if op == "create":
                tenant = rng.choice(TENANTS)
                kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                n = rng.randint(1, 6)
                created = await stubs[tenant].CreateRun(run_request(targets[kind](), n))
                mix.runs.append(TrackedRun(tenant, created.run.id, kind, n))
            elif op == "update":
                run = rng.choice(mix.runs)
                await stubs[run.tenant].UpdateRun(
                    pb.UpdateRunRequest(
                        run_id=run.run_id,
                        run=run_pb2.Run(display_name=f"n{rng.randrange(100)}", labels={"k": "v"}),
                        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "labels"]),
                    )
                )
            else:
                assert await mix.shared(op), op
            mix.done[op] += 1
        print(f"operations done: {dict(mix.done)}; runs by kind: {dict(Counter(r.kind for r in mix.runs))}")

        await mix.cancel_every("hung")
        ended = await mix.all_end()
        for tracked, run in zip(mix.runs, ended, strict=True):
            if tracked.cancel_asked:
                continue  # cancelled, or finished before the cancel: either way it ended
            expected = run_pb2.RUN_STATUS_FAILED if tracked.kind == "failing" else run_pb2.RUN_STATUS_SUCCEEDED
            assert run.status == expected, f"{tracked} ended {run_pb2.RunStatus.Name(run.status)} {note}"
            counts = run.counts
            assert counts.completed_evaluations == tracked.items, f"{tracked}: {counts} {note}"
            assert (counts.errored if tracked.kind == "failing" else counts.passed) == tracked.items, note
        await mix.watchers_saw_every_event()
        await mix.executor_let_go(srv)

        # The executor still claims, for every tenant, on the very host whose calls hung and were cancelled.
        for stub in stubs.values():
            for target in (echo(), webhook(hung.url + "/fast")):
                run = await create_and_finish(stub, run_request(target, 3), within_s=10)
                assert run.status == run_pb2.RUN_STATUS_SUCCEEDED, note
        assert srv.outbound.limit_of(hung.url).in_flight == 0, note
        mix.executor_idle_and_healthy(srv)


# The interleaving over limits: tenants pass --max-stored-bytes-per-tenant and budgets as it goes.
LIMIT = 250_000  # --max-stored-bytes-per-tenant: a few big runs or filler datasets pass it
# A big run's items: its target answers each with BIG_ANSWER characters more, so its outputs pass its
# tenant's bytes as its first jobs (--workers at a time) are recorded, with more of its jobs to start.
BIG_ITEMS = (20, 40)
FILLER = [item_pb2.Item(input="y" * 10_000) for _ in range(4)]  # a filler dataset's items: 40 KB
PAID_TOKENS = 100  # a paid call's prompt tokens: $0.10 at PRICES' gpt-test
TENANT_BUDGET_USD = 6.0  # --tenant-budget-usd: a few paid runs reach it (and then stop its webhooks' calls too)
RUN_BUDGET_USD = 0.15  # a budgeted run's max_cost_usd: two answered calls pass it
# A budgeted run's items: more than the calls that may start before two answers are counted (one
# answered, then at most --workers in flight), so it cannot finish under its budget.
BUDGETED_ITEMS = 30
# "some-hung": a big run, one in ten of whose calls hang: it passes its tenant's bytes and waits for them
# until it is cancelled.
OVER_KINDS = {"echo": 2, "recorded": 2, "slow": 4, "hung": 1, "some-hung": 1, "paid": 3}
OVER_OPERATIONS = {
    "create": 32,
    "cancel": 8,
    "delete": 5,
    "undelete": 4,
    "watch": 16,
    "disconnect": 10,
    "fill": 8,  # a dataset of FILLER for a tenant (refused past its bytes)
    "make_room": 8,  # a tenant deletes one of its datasets
}


ASKED = grader_pb2.Grader(name="asked", contains=grader_pb2.Contains(values=["q"]))  # the answer holds the input


def paid(url: str) -> target_pb2.Target:
    """A chat target whose every answer reports PAID_TOKENS of usage."""
    return target_pb2.Target(
        chat=target_pb2.ChatTarget(
            endpoint=target_pb2.Endpoint(base_url=url + "/paid/v1", timeout_s=HUNG_CALL_TIMEOUT_S), model="gpt-test"
        )
    )


@dataclass
class Storing:
    """A tenant's run and dataset stubs."""

    runs: RunStub
    datasets: dataset_service_pb2_grpc.DatasetServiceStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> Storing:
        return cls(RunStub(channel), dataset_service_pb2_grpc.DatasetServiceStub(channel))


def _asked_items(hook: Webhook, tag: str) -> list[str]:
    """The ids of the items of the run tagged `tag` its target was called for, one per call."""
    return sorted(f"i{words[2]}" for words in (asked.split(" ") for asked in hook.inputs) if words[0] == tag)


async def test_random_interleaving_over_stored_bytes_and_budgets_leaves_every_run_live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs whose tenant passes its stored bytes wait for their jobs that had made a call and end once
    those are recorded; runs over a budget stop theirs. A seeded random interleaving of creates (some
    sized to pass the tenant's bytes, some with a max_cost_usd they pass), cancels, deletes, undeletes,
    watches, disconnects, filler datasets and their deletion (making room), over targets that answer at
    once, slowly, never (until cancelled) or for money: within a bound after the last operation every
    run has ended - none left RUNNING waiting for calls that were cancelled or never counted - each run
    ended over its bytes has a result for every call made for it and no other, budgets still end runs
    BUDGET_EXCEEDED, watchers saw every event, and the executor is left with nothing in flight, waited
    for or leased, its loops never restarted, and every tenant, once it made room, runs again."""
    caplog.set_level(logging.INFO, logger=executor_module.__name__)  # which runs passed their tenant's bytes
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    async with (
        serving(
            tmp_path,
            workers=16,
            max_stored_bytes_per_tenant=LIMIT,
            tenant_budget_usd=TENANT_BUDGET_USD,
            price_table=str(prices),
        ) as srv,
        Webhook(slow_s=0.1) as slow,
        Webhook() as paying,
        Webhook() as hung,
        Webhook() as stuck,
        tenants_on(srv, Storing.on, *TENANTS) as storing,
    ):
        stubs = {name: s.runs for name, s in storing.items()}
        mix = Interleaving(stubs, operations=200)
        rng, note = mix.rng, mix.note
        targets: dict[str, Callable[[str], target_pb2.Target]] = {
            "echo": lambda big: echo(),
            "recorded": lambda big: recorded(),
            "slow": lambda big: webhook(slow.url + big + "/slow"),
            "hung": lambda big: webhook(hung.url + big + "/hang"),
            "some-hung": lambda big: webhook(stuck.url + big + "/hang-some"),
            "paid": lambda big: paid(paying.url + big),
        }
        hooks = {"slow": slow, "paid": paying, "hung": hung, "some-hung": stuck}
        datasets: dict[str, list[str]] = defaultdict(list)
        refused: Counter[str] = Counter()

        for _ in range(mix.operations):
            op = mix.pick(OVER_OPERATIONS)
            if op == "create":
                tenant = rng.choice(TENANTS)
                kind = rng.choices(list(OVER_KINDS), weights=list(OVER_KINDS.values()))[0]
                budget = RUN_BUDGET_USD if kind == "paid" and rng.random() < 0.4 else None
                big = kind == "some-hung" or (kind in hooks and budget is None and rng.random() < 0.4)
                n = BUDGETED_ITEMS if budget else rng.randint(*BIG_ITEMS) if big else rng.randint(1, 8)
                tag = f"r{mix.done['create']}"
                request = run_request(targets[kind]("/big" if big else ""), n, ask=f"{tag} q {{}}")
                request.ClearField("graders")
                request.graders.append(ASKED)  # a big answer passes too
                if budget:
                    request.max_cost_usd = budget
                try:
                    created = await stubs[tenant].CreateRun(request)
                except grpc.aio.AioRpcError as error:
                    assert_over(error, "max_stored_bytes_per_tenant")
                    refused[op] += 1
                else:
                    mix.runs.append(TrackedRun(tenant, created.run.id, kind, n, tag=tag, max_cost_usd=budget))
            elif op == "fill":
                tenant = rng.choice(TENANTS)
                try:
                    dataset = await storing[tenant].datasets.CreateDataset(
                        ds.CreateDatasetRequest(dataset=ds.Dataset())
                    )
                    datasets[tenant].append(dataset.dataset.id)
                    await storing[tenant].datasets.AddDatasetItems(
                        ds.AddDatasetItemsRequest(dataset_id=dataset.dataset.id, items=FILLER)
                    )
                except grpc.aio.AioRpcError as error:
                    assert_over(error, "max_stored_bytes_per_tenant")
                    refused[op] += 1
            elif op == "make_room":
                holding = [t for t in TENANTS if datasets[t]]
                if holding:
                    tenant = rng.choice(holding)
                    dataset_id = datasets[tenant].pop(rng.randrange(len(datasets[tenant])))
                    await storing[tenant].datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id))
            else:
                assert await mix.shared(op), op
            mix.done[op] += 1
        print(f"operations done: {dict(mix.done)}, refused {dict(refused)}")

        # The runs whose calls hang are cancelled last, once the others have ended: nothing else is left
        # to wake the executor then, and those that passed their tenant's bytes wait for those calls. (The
        # others of their tenants may wait for them too: hung calls can fill a tenant's room for calls,
        # --max-workers-per-tenant, which bounds what its endpoints take from the other tenants.)
        hanging = ("hung", "some-hung")
        held = {r.tenant for r in mix.runs if r.kind in hanging and not r.cancel_asked}
        await mix.all_end([r for r in mix.runs if r.tenant not in held or r.cancel_asked])
        for kind in hanging:
            await mix.cancel_every(kind)
        ended = await mix.all_end()
        # The line names the run first.
        marked = {r.args[0] for r in caplog.records if "ends over its tenant's stored bytes" in r.getMessage()}
        endings: Counter[str] = Counter()
        for tracked, run in zip(mix.runs, ended, strict=True):
            results = await stubs[tracked.tenant].ListRunResults(
                pb.ListRunResultsRequest(run_id=run.id, page_size=1000)
            )
            recorded_items = sorted(r.item_id for r in results.results)
            assert len(recorded_items) == run.counts.completed_evaluations, f"{tracked}: {run.counts} {note}"
            ending = run.error.code or run_pb2.RunStatus.Name(run.status)
            endings[f"{tracked.kind}{'*' if tracked.max_cost_usd else ''}: {ending}"] += 1
            if tracked.cancel_asked:
                continue  # cancelled, or ended before the cancel: either way it ended
            allowed = {"RUN_STATUS_SUCCEEDED", "STORAGE_QUOTA_EXCEEDED"}
            if tracked.kind in hooks:  # the tenant's budget stops its calls, paid or not
                allowed.add("BUDGET_EXCEEDED")
            if tracked.max_cost_usd:  # it cannot finish within its own budget
                allowed.discard("RUN_STATUS_SUCCEEDED")
            assert ending in allowed, f"{tracked} ended {ending}: {run.error.message} {note}"
            # Passing its tenant's bytes is its ending, whatever budget it passes while its calls finish.
            over_bytes = run.id in marked
            assert over_bytes == (ending == "STORAGE_QUOTA_EXCEEDED"), f"{tracked} ended {ending} {note}"
            if ending == "RUN_STATUS_SUCCEEDED":
                assert run.counts.passed == tracked.items, f"{tracked}: {run.counts} {note}"
            if tracked.kind in hooks:
                called = _asked_items(hooks[tracked.kind], tracked.tag)
                if ending == "BUDGET_EXCEEDED":  # calls in flight as it passed its budget are abandoned
                    assert set(recorded_items) <= set(called), f"{tracked}: {recorded_items} of {called} {note}"
                else:  # every call made has its result, and no call was made twice
                    assert recorded_items == called, f"{tracked} {ending}: {recorded_items} for {called} {note}"
        cancelled_over = sum(r.run_id in marked and r.cancel_asked for r in mix.runs)
        print(f"endings: {dict(sorted(endings.items()))}; {len(marked)} over their bytes, {cancelled_over} cancelled")
        await mix.watchers_saw_every_event()
        await mix.executor_let_go(srv)

        # Every tenant makes room (deletes its datasets and runs, purged at once: kept until now so that
        # UndeleteRun found them) and runs again, on the very host whose calls hung and were cancelled; one
        # past its budget (which purges do not give back) has its calls stopped.
        for tenant in TENANTS:
            for dataset_id in datasets.pop(tenant, []):
                await storing[tenant].datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=dataset_id))
        for tracked in mix.runs:
            if not tracked.deleted:
                await stubs[tracked.tenant].DeleteRun(pb.DeleteRunRequest(run_id=tracked.run_id))
        srv.purger._retention_s = 0.0
        await srv.purger.purge()
        for tenant, stub in stubs.items():
            spent = srv.executor._tenant_spent.get(tenant, 0.0)  # what its budget is checked against
            run = await create_and_finish(stub, run_request(echo(), 3), within_s=10)
            assert run.status == run_pb2.RUN_STATUS_SUCCEEDED, f"{tenant}: {run.error} {note}"
            run = await create_and_finish(stub, run_request(webhook(hung.url + "/fast"), 3), within_s=10)
            ending = run.error.code or run_pb2.RunStatus.Name(run.status)
            expected = "BUDGET_EXCEEDED" if spent >= TENANT_BUDGET_USD else "RUN_STATUS_SUCCEEDED"
            assert ending == expected, f"{tenant} (spent ${spent:.2f}): {run.error} {note}"
        for hook in hooks.values():
            assert srv.outbound.limit_of(hook.url).in_flight == 0, note
        mix.executor_idle_and_healthy(srv)


async def test_watchdog_reports_a_stuck_database_writer_and_its_recovery(tmp_path: Path) -> None:
    """Every write waits for the one writer task: one stuck in a write (a hung disk, a lock never
    granted) while others queue turns health NOT_SERVING; when it moves again, SERVING, and every
    queued write commits."""
    async with (
        serving(tmp_path, stall_s=0.5, poll_interval_s=0.1) as srv,
        tenants(srv, "a") as t,
        contextlib.AsyncExitStack() as stack,
    ):
        unstuck, stuck = asyncio.Event(), asyncio.Event()

        async def hang(conn: Any) -> None:
            stuck.set()
            await unstuck.wait()

        # Whatever the test does, the writer must not stay stuck: the server's shutdown waits for it.
        stack.callback(unstuck.set)

        async with keyed_channel(srv.port, "") as channel:
            statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            serving_ = health_pb2.HealthCheckResponse.SERVING
            assert (await asyncio.wait_for(statuses.read(), 5)).status == serving_
            hung = asyncio.create_task(srv.db.transact(hang))
            await stuck.wait()
            create = asyncio.ensure_future(t["a"].CreateRun(run_request(echo(), 2)))  # queues behind it
            assert (await asyncio.wait_for(statuses.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            sample = srv.metrics.registry.get_sample_value
            assert sample("evalsvc_loop_stalled", {"loop": "writer"}) == 1
            assert not create.done()

            unstuck.set()
            await hung
            assert (await asyncio.wait_for(statuses.read(), 10)).status == serving_
            run = (await create).run
            assert (await finish(t["a"], run.id, within_s=10)).status == run_pb2.RUN_STATUS_SUCCEEDED
            assert sample("evalsvc_loop_stalled", {"loop": "writer"}) == 0
            statuses.cancel()
