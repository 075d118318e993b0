"""How the executor ends a run over its limit when tries fail (evalsvc.execution.executor.OverLimit):
`fail_early` is replaced by a stand-in that commits, fails and answers as a database would, so every
try's amount and every dollar its stopped jobs handed over can be followed. No server, no database."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest

from evalsvc.execution import executor as executor_module
from evalsvc.execution.executor import BudgetExceeded, CacheUse, Executor, OverLimit
from evalsvc.execution.recorder import EarlyEnd


class Database:
    """What the tries committed: the run's cost_usd, the tenant's spend and the run's end time."""

    def __init__(self) -> None:
        self.run_cost = self.tenant_spend = 0.0
        self.end_time: float | None = None
        self.tries: list[tuple[float, float | None]] = []


def bare_executor(handed_first: float) -> Executor:
    """An executor holding one run marked to end over its budget, its stopped jobs having handed over
    `handed_first` so far; only what `_end_over_limit_runs` uses."""
    executor = Executor.__new__(Executor)
    executor._finished = []
    executor._in_flight = {}
    executor._calling = defaultdict(int)
    executor._finished_ready = asyncio.Event()
    executor._over_limit = {"r1": OverLimit("BUDGET_EXCEEDED", "over its budget")}
    executor._stopped_spend = {"r1": ("t1", handed_first)}
    executor._unwritten_spend = defaultdict(float)
    executor._db = None  # type: ignore[assignment]

    async def plan(run_id: str) -> Any:
        return SimpleNamespace(tenant="t1", recorder_view=None)

    executor._plan = plan  # type: ignore[method-assign]
    executor.run_ended = lambda run_id: None  # type: ignore[method-assign]
    executor._publish_end = lambda run_id, end: None  # type: ignore[method-assign]
    return executor


def hand_over(executor: Executor, usd: float) -> None:
    """A job of the run that outlasted the wait stops and hands over what it spent (`Executor._stopped`)."""
    tenant, held = executor._stopped_spend.get("r1", ("t1", 0.0))
    executor._stopped_spend["r1"] = (tenant, held + usd)


async def test_a_retry_after_a_lost_answer_and_a_failed_try_counts_every_dollar_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Try 1 commits its $1.00 and the answer is lost; a job hands over $0.50; try 2 fails before it
    commits; another $0.25; try 3 finds the run ended by try 1. Each try used to carry what had been
    handed over by then, so try 3 took $1.50 as in the run's cost_usd, which held $1.00: $0.50 was
    counted nowhere. The ending is fixed at the first try: every try carries its $1.00, and what comes
    after goes to the tenant's spend alone."""
    db = Database()

    async def fail_early(*args: Any, spent_usd: float = 0.0, end_time: float | None = None) -> EarlyEnd:
        db.tries.append((spent_usd, end_time))
        if len(db.tries) == 1:  # committed, and the connection lost the answer
            db.run_cost += spent_usd
            db.tenant_spend += spent_usd
            db.end_time = end_time
            raise ConnectionError("connection reset after COMMIT")
        if len(db.tries) == 2:
            raise ConnectionError("the database is down: nothing ran")
        return EarlyEnd(db.end_time == end_time, None)

    monkeypatch.setattr(executor_module, "fail_early", fail_early)
    executor = bare_executor(1.0)
    for handed in (0.5, 0.25, 0.0):
        with contextlib.suppress(ConnectionError):
            await executor._end_over_limit_runs()
        hand_over(executor, handed)

    [(first, end_time), *later] = db.tries
    assert first == 1.0 and later == [(1.0, end_time)] * 2
    assert "r1" not in executor._over_limit and db.run_cost == 1.0
    assert db.tenant_spend + executor._unwritten_spend["t1"] == pytest.approx(1.75)


@pytest.mark.parametrize("committed", [True, False])
async def test_a_run_ended_otherwise_after_a_failed_try_puts_all_it_carried_in_the_tenants_spend(
    monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """A try fails; the run is then found ended, by this ending (its first try committed) or otherwise
    (cancelled meanwhile): the amount is in its cost_usd in the first case only."""
    db = Database()

    async def fail_early(*args: Any, spent_usd: float = 0.0, end_time: float | None = None) -> EarlyEnd:
        db.tries.append((spent_usd, end_time))
        if len(db.tries) == 1:
            if committed:
                db.tenant_spend += spent_usd
                db.end_time = end_time
            raise ConnectionError("the connection was lost")
        return EarlyEnd(db.end_time == end_time, None)

    monkeypatch.setattr(executor_module, "fail_early", fail_early)
    executor = bare_executor(2.0)
    for _ in range(2):
        with contextlib.suppress(ConnectionError):
            await executor._end_over_limit_runs()
    assert db.tenant_spend + executor._unwritten_spend["t1"] == pytest.approx(2.0)


async def test_a_run_over_its_stored_bytes_ends_once_the_jobs_that_had_started_their_calls_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/errors.md: evaluations under way when a tenant passes its stored bytes still finish and are
    recorded. They were cancelled as the run ended: their target calls paid for, their results thrown
    away (a run of 40 target calls recorded 39). The run now waits for them; the last one wakes the
    recorder, and only then is the run ended."""
    ends: list[str] = []

    async def fail_early(db: Any, tenant: str, run_id: str, *args: Any, **kwargs: Any) -> EarlyEnd:
        ends.append(run_id)
        return EarlyEnd(True, None)

    monkeypatch.setattr(executor_module, "fail_early", fail_early)
    executor = bare_executor(0.0)
    executor._over_limit = {"r1": OverLimit("STORAGE_QUOTA_EXCEEDED", "over its bytes", started_jobs_finish=True)}
    calling = asyncio.get_running_loop().create_future()  # a job of r1 waiting for its target's answer
    job = asyncio.ensure_future(calling)
    executor._in_flight = {"r1": {job}}  # type: ignore[dict-item]
    executor._calling["r1"] = 1

    await executor._end_over_limit_runs()
    assert ends == [] and not job.cancelled() and "r1" in executor._over_limit  # it waits for the job

    calling.set_result(None)  # the job answers, is handed over and recorded
    executor._in_flight = {}
    executor._done_calling("r1")
    assert executor._finished_ready.is_set()  # the recorder is woken to end the run
    await executor._end_over_limit_runs()
    assert ends == ["r1"] and "r1" not in executor._over_limit


async def test_a_job_with_calls_under_way_as_its_run_passed_its_stored_bytes_makes_the_rest_within_the_budget() -> None:
    """A job whose calls were under way when its run passed its tenant's stored bytes goes on to its next
    calls (its judges: what it needs for a result); one that had made none is stopped at its first, as a
    job of a run over its budget is at any; the budget still stops them all."""
    executor = bare_executor(0.0)
    executor._settings = SimpleNamespace(tenant_budget_usd=0.0)  # type: ignore[assignment]
    executor._tenant_spent = {}
    job = SimpleNamespace(run_id="r1")
    plan = SimpleNamespace(max_cost_usd=1.0, spent_usd=0.5, tenant="t1")
    calling, not_yet = CacheUse(), CacheUse()
    executor._over_limit = {}
    executor._check_budget(job, plan, calling)  # type: ignore[arg-type]
    assert calling.calling and executor._calling["r1"] == 1
    executor._over_limit = {"r1": OverLimit("STORAGE_QUOTA_EXCEEDED", "over its bytes", started_jobs_finish=True)}
    executor._check_budget(job, plan, calling)  # type: ignore[arg-type]
    with pytest.raises(BudgetExceeded):
        executor._check_budget(job, plan, not_yet)  # type: ignore[arg-type]
    assert executor._calling["r1"] == 1  # the job that never called is not waited for
    plan.spent_usd = 1.0
    with pytest.raises(BudgetExceeded):
        executor._check_budget(job, plan, calling)  # type: ignore[arg-type]
    assert executor._over_limit["r1"].code == "STORAGE_QUOTA_EXCEEDED"  # the run's ending is kept
    executor._over_limit = {"r1": OverLimit("BUDGET_EXCEEDED", "over its budget")}
    plan.spent_usd = 0.0
    with pytest.raises(BudgetExceeded):
        executor._check_budget(job, plan, calling)  # type: ignore[arg-type]
