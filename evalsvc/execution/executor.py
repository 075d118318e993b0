"""The executor: a worker pool inside the server that leases jobs, executes them and records results.

Three loops share the work, each supervised (evalsvc.liveness: restarted after any failure, ended
only by shutdown) and watched for progress:
- the claimer leases batches of jobs while there are free worker slots, split fairly across tenants and
  then runs (evalsvc.execution.fairness), and starts a task per job;
- each job task calls the target (after any warmup calls), grades the output with every grader, and
  queues the finished job;
- the recorder commits queued jobs in batches (`recorder.record`), so a large run costs few transactions,
  and publishes the committed events to watchers.
A keeper extends the leases of jobs still in flight.

A job task holds a worker slot (`--workers`) while it works, but not while a shared resource holds it
up: its endpoint (it queues for a slot of the endpoint's concurrency limit, in its tenant's turn, or
backs off before a retry) or a grading process. A run stuck behind a slow, hung or throttling endpoint
keeps at most that endpoint's limit of workers busy, and claims no more jobs while its jobs wait, so
other runs keep theirs. A tenant's calls in progress are at most --max-workers-per-tenant
(evalsvc.http.outbound: a job waits for its tenant's room holding neither a worker nor an endpoint
slot), so a tenant with runs on many hung endpoints (each holding its limit of workers) cannot hold
every worker: it did, and no other tenant's job was claimed until the hung calls timed out.

Cancelling a run cancels its tasks at once; everything a task holds (worker slot, endpoint slot, its
share of the claim whose lease the keeper renews) is given back in `finally` blocks and context
managers, so a cancellation releases it like any other ending. The fence in the recorder makes sure
nothing of a cancelled run is recorded even if a job finished meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import cast

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.config import Settings, flag_name
from evalsvc.events.bus import EventBus
from evalsvc.execution import cache
from evalsvc.execution.fairness import RoundRobin
from evalsvc.execution.recorder import (
    ALONE_FROM_EVALUATIONS,
    CacheBounds,
    EarlyEnd,
    FinishedJob,
    RunGraders,
    fail_early,
    record,
    stored_bytes,
)
from evalsvc.graders import CompiledGrader, Grade, compile_grader, grader_failed_grade, grader_name, target_error_grade
from evalsvc.graders.judge import JudgeDefaults, LlmJudgeGrader
from evalsvc.graders.pool import GradingPool, may_offload, offloads
from evalsvc.http.outbound import Outbound, call_guard, call_tenant, endpoint_wait
from evalsvc.liveness import Progress, Watched, supervise
from evalsvc.metrics import Metrics
from evalsvc.secrets.refs import run_secret_refs
from evalsvc.secrets.service import SecretService
from evalsvc.slots import Hold, Slots
from evalsvc.store import jobs as job_store
from evalsvc.store import runs as run_store
from evalsvc.store import usage
from evalsvc.store.cache import CacheEntry
from evalsvc.store.db import Database, is_conflict, public_text, unavailable_cause
from evalsvc.store.jobs import ClaimedJob
from evalsvc.store.models import CACHE_JUDGE_VERDICT, CACHE_TARGET_OUTPUT
from evalsvc.targets import PriceTable, Target, TargetError, answers_locally, build_target, replays_records
from evalsvc.v1 import cache_pb2, grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb

log = logging.getLogger(__name__)

# A job whose run cannot even be loaded is retried on later leases (another replica, perhaps a newer
# version, may manage); after this many attempts the run is failed instead of waiting forever.
MAX_LOAD_ATTEMPTS = 3
# A REPLAY job whose cache lookup fails for a passing cause (the database could not serve: a timeout,
# a busy file) is handed back, to run again when its lease expires, up to this attempt; at it, the
# evaluation is ERROR CACHE_UNAVAILABLE.
MAX_CACHE_LOOKUP_ATTEMPTS = 3
# The error_reason code of an evaluation whose REPLAY lookup the database could not answer: at the
# job's MAX_CACHE_LOOKUP_ATTEMPTS-th attempt, or at any attempt when the failure was not a passing one.
CACHE_UNAVAILABLE = "CACHE_UNAVAILABLE"


class HandedBack(Exception):
    """A job that cannot go on now for a passing reason (the database could not answer its REPLAY
    cache lookup): it is not recorded, and runs again when its lease expires."""


# Longest stretch of local jobs executed before the claim loop lets the event loop serve others.
INLINE_SLICE_S = 0.002
# How many ended runs the executor remembers (see Executor.run_ended). A claim is turned into tasks
# within one turn of the claim loop, long before this many further runs can end.
REMEMBERED_ENDS = 10_000
# Items of runs created here whose plans wait for their first claim (see `Executor.created`).
MAX_CREATED_ITEMS = 200_000
# How long, in seconds, ending a run over a limit waits for its jobs still working, cancelled, to hand
# over what they spent, so that it is in the cost written with the run's end (cancellation is prompt; what
# a job that outlasts this spent is in no cost_usd).
STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class CreatedRunInputs:
    """What a run's plan is built from, as CreateRun committed it: its definition and items, serialized."""

    run_id: str
    tenant: str
    spec: bytes
    items: Sequence[bytes]


@dataclass
class RunPlan:
    """Everything needed to execute a run's jobs, loaded once per run and process."""

    tenant: str
    items: list[item_pb2.Item]
    target: Target
    graders: list[CompiledGrader | LlmJudgeGrader]
    warmup_runs: int
    recorder_view: RunGraders
    max_cost_usd: float | None
    spent_usd: float  # committed spend at load time plus what this process spent since
    offloads_grading: bool  # some output may be big enough to be graded in a grading process
    target_spec: target_pb2.Target
    cache_mode: int  # CacheMode, the server's default already applied

    @property
    def local(self) -> bool:
        """Whether its jobs run without any I/O (recorded responses, deterministic graders on small
        outputs): they never wait, so they need no worker slot and no task of their own."""
        return (
            answers_locally(self.target)
            and not self.offloads_grading
            and not any(isinstance(g, LlmJudgeGrader) for g in self.graders)
        )


@dataclass
class CacheUse:
    """What one job took from and gives to the response cache (the recorder writes it)."""

    output_cached: bool = False
    hits: list[str] = field(default_factory=list)
    writes: list[CacheEntry] = field(default_factory=list)
    warmup_usd: float = 0.0  # what its warmup calls cost: part of no result, recorded with the job all the same
    # What all its answered calls cost, as `Executor._spend` counted them: recorded with its run's end
    # when the job is stopped without a result because its run is ending over a limit (`_stopped`).
    spent_usd: float = 0.0
    # Whether it has passed its first call's guard (`Executor._check_budget`): counted in `Executor._calling`
    # from then on, so a run ending over its stored bytes waits for it.
    calling: bool = False


@dataclass(frozen=True)
class OverLimit:
    """A run to end FAILED (its budget or its tenant's stored bytes) once what it finished is recorded.

    Its first try to end it fixes the ending (`ending`): its end time, and the stopped jobs' spend it
    carries into the run's cost_usd (`carried_usd`, of `tenant`). Every later try (after a failure) ends
    it the same way, so one that finds the run ended with this end time (PostgreSQL committed an earlier
    try and the answer was lost: `fail_early`'s `ours`) knows exactly what its cost_usd holds; what jobs
    hand over after the first try goes to the tenant's spend alone. (A try carrying more than the one
    that committed counted the difference nowhere.)"""

    code: str
    message: str
    end_time: float | None = None
    carried_usd: float = 0.0
    tenant: str = ""
    # Whether the run's jobs that had made calls when it passed the limit finish and are recorded before it
    # ends (its tenant's stored bytes: those calls are paid for, and the bound is soft by what they store),
    # rather than being stopped at their next call and abandoned (its budget: no further call may be paid
    # for). Its jobs that had made none are stopped at their first, either way.
    started_jobs_finish: bool = False

    def ending(self, tenant: str, carried_usd: float) -> OverLimit:
        """This limit with its ending fixed now, carrying `carried_usd`."""
        return replace(self, end_time=time.time(), carried_usd=carried_usd, tenant=tenant)


class BudgetExceeded(Exception):
    """A run or its tenant has spent its budget: no new model call may start."""


class Executor:
    """Executes the jobs of every active run in the database, together with any other replicas."""

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        outbound: Outbound,
        prices: PriceTable,
        judge: JudgeDefaults,
        secrets: SecretService,
        grading: GradingPool,
    ) -> None:
        self._db = db
        self._secrets = secrets
        self._grading = grading
        self._outbound = outbound
        self._prices = prices
        self._judge = judge
        self._tenant_spent: dict[str, float] = {}
        # The bytes each tenant stores (evalsvc.store.usage), as this process knows them: read with its first
        # plan, raised by this process's recordings, read again every lease interval while it has plans here
        # (other replicas record too), and before a run is stopped on them.
        self._tenant_stored: dict[str, int] = {}
        # Runs to end FAILED once what they finished is recorded, by run id.
        self._over_limit: dict[str, OverLimit] = {}
        # What the jobs of those runs stopped without a result (BudgetExceeded, or cancelled by the run's
        # end) had spent, by run id, with the run's tenant: written with the run's end (`_end_over_limit_runs`).
        self._stopped_spend: dict[str, tuple[str, float]] = {}
        # What other jobs stopped without a result (their run cancelled or deleted, a shutdown) had spent, by
        # tenant, until the recorder adds it to the tenant's spend (`_write_stopped_spend`): in no run's
        # cost, yet paid for, so the tenant's budget must count it after a restart and on replicas.
        self._unwritten_spend: defaultdict[str, float] = defaultdict(float)
        self._cache_bounds = CacheBounds(settings.cache_max_entries, settings.cache_max_bytes)
        self._bus = bus
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._metrics.jobs_running.set_function(self._busy)
        self._metrics.jobs_held_up.set_function(lambda: sum(self._held_up_jobs.values()))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._cache = cache.ResponseCache(db)
        self._plans: dict[str, asyncio.Task[RunPlan]] = {}
        self._created: dict[str, CreatedRunInputs] = {}  # insertion order: oldest first
        self._created_items = 0
        self._in_flight: dict[str, set[asyncio.Task[None]]] = defaultdict(set)
        # Jobs with calls under way (past their first call's guard, `_check_budget`) or with a result an inline
        # claim has not handed over yet (`_hand_over_part`), by run id: what a run over its bytes waits for.
        self._calling: defaultdict[str, int] = defaultdict(int)
        # Job tasks made but not yet started: one cancelled now never runs `_run_job`'s `finally`, so
        # `_task_done` gives back its share of the claim instead (see `_run_job`).
        self._not_started: set[asyncio.Task[None]] = set()
        self._workers = Slots(settings.workers)
        self._held_up_jobs: dict[str, int] = {}  # run id -> its jobs waiting on their endpoint or a grading process
        self._round_robin = RoundRobin()
        self._ended: dict[str, None] = {}  # runs that ended while this process may have held jobs, oldest first
        self._open_claims: dict[str, int] = {}
        self._finished: list[FinishedJob] = []
        self._work_available = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._finished_ready = asyncio.Event()
        self._recorded = asyncio.Event()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._progress = {name: Progress() for name in ("claim", "record", "leases")}

    async def start(self) -> None:
        """Reclaim leases a crashed predecessor left (SQLite has one server: it holds the file's serve lock,
        evalsvc.store.serve_lock) and start the loops."""
        self._stopping = False
        self._stop_requested.clear()
        if self._db.is_sqlite:
            released = await self._db.transact(job_store.release_all)
            if released:
                log.info("requeued %d jobs leased before the last shutdown", released)
        for progress in self._progress.values():
            progress.beat()
        self._loops = [
            asyncio.create_task(self._supervised("claim", self._claim_loop), name="executor-claim"),
            asyncio.create_task(self._supervised("record", self._record_loop), name="executor-record"),
            asyncio.create_task(self._supervised("leases", self._keep_leases), name="executor-leases"),
        ]
        self.wake()

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        await supervise(name, loop, self._stop_requested, self._metrics)

    def watched_loops(self) -> list[Watched]:
        """The loops the watchdog checks, each with what counts as work waiting for it."""
        lease_interval = self._settings.lease_ttl_s / 3
        stall_s = self._settings.stall_s
        return [
            Watched(
                "claim", self._progress["claim"], self._jobs_claimable, max(stall_s, 2 * self._settings.poll_interval_s)
            ),
            Watched("record", self._progress["record"], self._jobs_to_record, stall_s),
            Watched("leases", self._progress["leases"], self._leases_to_keep, max(stall_s, 2 * lease_interval)),
        ]

    async def _jobs_claimable(self) -> bool:
        """Whether any active run has a job that could be claimed now (and this process has room)."""
        if self._busy() >= self._settings.workers:
            return False
        async with self._db.read() as conn:
            return bool(await run_store.claimable_runs(conn, time.time()))

    async def _jobs_to_record(self) -> bool:
        return bool(self._finished)

    async def _leases_to_keep(self) -> bool:
        return bool(self._open_claims)

    def wake(self) -> None:
        """New jobs exist: look for them now instead of at the next poll."""
        self._work_available.set()

    def in_flight(self) -> int:
        """Jobs being executed by this process."""
        return sum(len(tasks) for tasks in self._in_flight.values())

    def _busy(self) -> int:
        """Jobs that hold (or are about to take) a worker slot: in flight, less those held up."""
        return self.in_flight() - sum(self._held_up_jobs.values())

    def run_ended(self, run_id: str) -> None:
        """Stop this process's work on a run that ended - cancelled or deleted here, or ended by another
        replica (EventListener hears of it) - at once, and forget its plan.

        Its tasks are cancelled, and the run is remembered: a claim that committed just before the
        end may not have started its jobs yet, and they must not start now (the fence would keep
        their results out, but a call to a hung endpoint would hold its slots until it timed out)."""
        self._ended[run_id] = None
        while len(self._ended) > REMEMBERED_ENDS:
            del self._ended[next(iter(self._ended))]
        for task in list(self._in_flight.get(run_id, ())):
            task.cancel()
        self._forget(run_id)

    async def stop(self) -> None:
        """Stop claiming, abandon jobs in flight, record what already finished and release the rest.

        The loops stop cooperatively, never by cancellation: a task cancelled inside a SQLite write
        transaction can leave its connection holding the write lock."""
        self._stopping = True
        self._work_available.set()
        self._slot_free.set()
        self._recorded.set()
        self._stop_requested.set()
        for loop in self._loops:
            if loop.get_name() == "executor-claim":
                await loop
        # Every claim held now is handed back below, also those whose jobs are all in flight: a cancelled
        # job gives up its share of the claim as it ends, which would leave the claim out of the release
        # (its jobs leased until the lease expired, on PostgreSQL, though they are worked on no more).
        claims = sorted(self._open_claims)
        tasks = [t for run_tasks in self._in_flight.values() for t in run_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._finished_ready.set()
        await asyncio.gather(*self._loops)
        self._loops = []
        # What the cancelled jobs had spent: the recorder may have ended before they handed it over.
        for run_id in list(self._over_limit):
            self._give_up_ending(run_id)
        for run_id in list(self._stopped_spend):
            self._unwritten(run_id)
        try:
            if self._unwritten_spend:
                await self._write_stopped_spend()
        except Exception as exc:
            log.warning(
                "could not write what jobs stopped by the shutdown had spent (%s): their tenants' budgets "
                "will not count $%.4f",
                unavailable_cause(exc) or type(exc).__name__,
                sum(self._unwritten_spend.values()),
            )
            self._unwritten_spend.clear()
        try:
            await self._db.transact(functools.partial(job_store.release, claim_ids=claims))
        except Exception as exc:
            if (cause := unavailable_cause(exc)) is None:
                raise
            # Nothing is lost: the leases expire and another worker (or the next start) reclaims them.
            log.warning(
                "could not hand back the jobs of %d claims (%s); their leases expire instead", len(claims), cause
            )
        self._open_claims.clear()
        # A stopped executor keeps nothing it was handed: if it starts again, it reads runs back.
        self._created.clear()
        self._created_items = 0

    async def _claim_loop(self) -> None:
        """Claim turn after turn. The loop beats after each turn it completes, never as it (re)starts: a
        loop that fails every turn (a full disk) and is restarted every few seconds makes no progress,
        and the watchdog must see that (counted as turns, the restarts kept health SERVING for as long as
        the disk stayed full)."""
        local_queue = False  # whether the last claim held only local jobs (see RunPlan.local)
        while not self._stopping:
            local_queue = await self._claim_turn(local_queue)
            self._progress["claim"].beat()

    async def _claim_turn(self, local_queue: bool) -> bool:
        """One turn of the claim loop: wait for a free worker slot, or claim and start jobs, or wait for
        new ones. Whether the claim held only local jobs."""
        room = self._settings.workers - self._busy()
        if room <= 0:
            self._slot_free.clear()
            with contextlib.suppress(TimeoutError):  # a turn per poll interval: the watchdog sees a live loop
                await asyncio.wait_for(self._slot_free.wait(), self._settings.poll_interval_s)
            return local_queue
        # `--workers` bounds jobs that wait on a model. Local jobs finish as soon as they start,
        # so while the queue holds those, claim whole batches: one claim and one recording per
        # `claim_batch` jobs instead of per `workers`. A claim of model jobs is never larger than
        # the free slots, so one replica does not hoard jobs others could be running.
        # Cleared before the claim, not after it: a run committed while the claim reads (its `wake()` set the
        # event then) is not in what the claim saw, and clearing after it lost that wake for a poll interval.
        self._work_available.clear()
        jobs = await self._claim(self._settings.claim_batch if local_queue else min(room, self._settings.claim_batch))
        if not jobs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work_available.wait(), self._settings.poll_interval_s)
            return False
        try:
            local_queue = await self._all_local(jobs)
        except BaseException:
            # Interrupted (a stray cancellation restarts this loop) before the claim went to anyone:
            # nobody works on its jobs, so their leases are not renewed (see `_execute_inline`).
            for job in jobs:
                self._release_claim_slot(job.claim_id)
            raise
        if local_queue:
            await self._execute_inline(jobs)
            # Local jobs outpace the recorder: wait until it has taken this claim's outputs, so
            # one claim executes while the previous one is recorded and memory stays bounded.
            # Waiting for the recorder is a turn of this loop (the watchdog watches the recorder).
            while len(self._finished) > 0 and not self._stopping:
                self._recorded.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._recorded.wait(), self._settings.poll_interval_s)
                self._progress["claim"].beat()
            return True
        for job in jobs:
            task = asyncio.create_task(self._run_job(job))
            self._not_started.add(task)
            self._in_flight[job.run_id].add(task)
            task.add_done_callback(
                cast("Callable[[asyncio.Task[None]], object]", lambda t, job=job: self._task_done(job, t))
            )
        return False

    async def _all_local(self, jobs: list[ClaimedJob]) -> bool:
        """Whether every job of a claim is local (a run whose plan cannot load is not)."""
        for run_id in {job.run_id for job in jobs} - self._ended.keys():
            try:
                if not (await self._plan(run_id)).local:
                    return False
            except Exception:  # _execute reports it, per job
                return False
        return True

    async def _execute_inline(self, jobs: list[ClaimedJob]) -> None:
        """Execute local jobs one after another on the claim loop, yielding to the event loop every
        few milliseconds so a claim of many graders does not stall RPCs and watchers.

        Their outputs go to the recorder in parts of at least ALONE_FROM_EVALUATIONS evaluations (the
        size a recording commits alone at), and the rest once the claim is done: handed over job by
        job, the recorder woke at the first yield and recorded a claim of 500 one-grader jobs as two
        or three transactions, each with its own run updates, events and commit, where one does."""
        yielded = time.perf_counter()
        part: list[FinishedJob] = []
        evaluations = executed = 0
        try:
            for job in jobs:
                if self._stopping:
                    break  # `stop` hands the rest of the claim back at once, rather than after all of it ran
                if await self._execute(job, into=part):
                    evaluations += len(part[-1].grades) or 1
                else:
                    self._release_claim_slot(job.claim_id)
                executed += 1
                if evaluations >= ALONE_FROM_EVALUATIONS:
                    self._hand_over_part(part)
                    part, evaluations = [], 0
                if time.perf_counter() - yielded > INLINE_SLICE_S:
                    await asyncio.sleep(0)
                    yielded = time.perf_counter()
                    # A turn of the claim loop: the watchdog must not take a long claim for a stuck loop.
                    self._progress["claim"].beat()
        finally:
            self._hand_over_part(part)
            # Interrupted (a stray cancellation restarts the claim loop): the jobs not executed are no
            # longer worked on here, so their leases are not renewed; they expire and another claim
            # runs them. Renewed, they stayed leased for good and their run never ended. At shutdown
            # they stay in the claim, which `stop` hands back (queued again) once the rest is recorded.
            if not self._stopping:
                for job in jobs[executed:]:
                    self._release_claim_slot(job.claim_id)

    def _hand_over(self, finished: list[FinishedJob]) -> None:
        """Queue finished jobs for the recorder, and wake it."""
        if finished:
            self._finished.extend(finished)
            self._finished_ready.set()

    def _hand_over_part(self, part: list[FinishedJob]) -> None:
        """Queue what `_execute_inline` executed for the recorder: only then are its jobs done with (a
        run ending over its stored bytes, ended before, would have left them unrecorded)."""
        self._hand_over(part)
        for finished in part:
            self._done_calling(finished.job.run_id)

    async def _claim(self, limit: int) -> list[ClaimedJob]:
        """Lease up to `limit` jobs, shared fairly among the runs that have claimable jobs, leaving out
        runs whose jobs already queue for an endpoint here (they have all the work they can use)."""
        claim_id = uuid.uuid4().hex
        now = time.time()

        async def claim(conn: AsyncConnection) -> tuple[list[ClaimedJob], list[pb.WatchRunResponse]]:
            runs = await run_store.claimable_runs(conn, now)
            # Runs ending over a limit are left out too: their jobs would only be claimed to be dropped
            # (`_over_storage`), again at every lease's expiry while the run waits for its last calls.
            wanted = [r for r in runs if r[1] not in self._held_up_jobs and r[1] not in self._over_limit]
            quotas = self._round_robin.shares(wanted, limit)
            jobs = await job_store.claim(
                conn,
                owner=self.owner,
                claim_id=claim_id,
                quotas=quotas,
                now=now,
                lease_ttl_s=self._settings.lease_ttl_s,
            )
            return jobs, await run_store.start_runs(conn, list({job.run_id for job in jobs}), now)

        jobs, started = await self._db.transact(claim)
        for event in started:
            self._bus.publish(event.run.id, [event])
        if jobs:
            self._open_claims[claim_id] = len(jobs)
        return jobs

    async def _run_job(self, job: ClaimedJob) -> None:
        """One job's task. However it ends - recorded, failed, cancelled - its worker slot is given back,
        and unless the job was queued for the recorder (which then owns it) so is its share of the claim,
        so the keeper stops renewing a lease nobody works under. (A task cancelled before it started -
        its run ended in the same turn it was made - never gets here: `_task_done` gives its share back.
        It was lost: the claim's id stayed in every lease renewal for good, one more per such job, until
        the renewal's statement outgrew PostgreSQL's 32,767 parameters and the leases loop failed.)"""
        self._not_started.discard(cast("asyncio.Task[None]", asyncio.current_task()))
        worker = Hold(self._workers, job.tenant)  # tenants take free workers in turn, also after a wait
        queued = False
        try:
            await worker.take()
            held_up = functools.partial(self._held_up, job.run_id, worker)
            endpoint_wait.set(held_up)
            queued = await self._execute(job, held_up)
        finally:
            worker.give_back()
            if not queued:
                self._release_claim_slot(job.claim_id)

    @contextlib.asynccontextmanager
    async def _held_up(self, run_id: str, worker: Hold) -> AsyncIterator[None]:
        """While a job is held up by a shared resource - its endpoint (it queues for a slot, or backs off
        before a retry) or a grading process (it waits for one, or one grades its output) - it holds no
        worker slot, and its run is left out of claims."""
        self._held_up_jobs[run_id] = self._held_up_jobs.get(run_id, 0) + 1
        worker.give_back()
        self._slot_free.set()
        try:
            yield
        finally:
            remaining = self._held_up_jobs.pop(run_id) - 1
            if remaining:
                self._held_up_jobs[run_id] = remaining
        await worker.take()  # only once the wait is over: a cancelled wait takes nothing back

    def _task_done(self, job: ClaimedJob, task: asyncio.Task[None]) -> None:
        if task in self._not_started:  # cancelled before it started: `_run_job` gave nothing back
            self._not_started.discard(task)
            self._release_claim_slot(job.claim_id)
        tasks = self._in_flight.get(job.run_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._in_flight[job.run_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("job %d of run %s failed", job.id, job.run_id, exc_info=task.exception())
        self._slot_free.set()

    def _release_claim_slot(self, claim_id: str) -> None:
        """One job of a claim no longer needs its lease kept."""
        remaining = self._open_claims.get(claim_id, 0) - 1
        if remaining > 0:
            self._open_claims[claim_id] = remaining
        else:
            self._open_claims.pop(claim_id, None)

    async def _execute(
        self,
        job: ClaimedJob,
        held_up: Callable[[], AbstractAsyncContextManager[None]] = contextlib.nullcontext,
        *,
        into: list[FinishedJob] | None = None,
    ) -> bool:
        """Run the target and graders for a job; True when it was queued for recording: handed to the
        recorder, or appended to `into`, whose owner hands it over (`_hand_over`). `held_up` is how the
        job waits for a grading process (see `_held_up`)."""
        if job.run_id in self._ended:  # claimed just before its run ended: neither run it nor load its plan again
            return False
        try:
            plan = await self._plan(job.run_id)
        except Exception as exc:
            if job.attempt < MAX_LOAD_ATTEMPTS:
                log.exception("cannot load run %s; its job %d is retried when its lease expires", job.run_id, job.id)
            else:
                await self._fail_unexecutable(job, exc)
            return False
        if await self._over_storage(job, plan):
            self._finished_ready.set()  # the recorder ends the run once what finished is recorded
            return False
        use = CacheUse()
        try:
            return await self._evaluate(job, plan, held_up, into, use)
        finally:
            if use.calling:
                self._done_calling(job.run_id)

    async def _evaluate(
        self,
        job: ClaimedJob,
        plan: RunPlan,
        held_up: Callable[[], AbstractAsyncContextManager[None]],
        into: list[FinishedJob] | None,
        use: CacheUse,
    ) -> bool:
        """`_execute`'s calls and grading, once the job may start: True when it was queued for recording."""
        item = plan.items[job.item_idx]
        # The one budget check: before every outbound call attempt of this job (target, warmups, judges,
        # retries), where the money is spent; calls that cost nothing are never stopped.
        call_guard.set(lambda: self._check_budget(job, plan, use))
        # Whose turn its calls (target, warmups, judges) wait for when their endpoint's slots are taken.
        call_tenant.set(plan.tenant)
        try:
            try:
                output = await self._respond(job, plan, item, use)
            except TargetError as exc:
                output, grades = self._target_failed(plan, exc.reason)
            except (BudgetExceeded, asyncio.CancelledError, HandedBack):
                raise
            except Exception as exc:  # a target bug must cost one evaluation, not the worker
                log.warning("the target of run %s failed on item %r", job.run_id, item.id, exc_info=True)
                output, grades = self._target_failed(plan, f"{type(exc).__name__}: {public_text(exc)}")
            else:
                grades = [(g.name, await self._grade(job, plan, g, item, output, use, held_up)) for g in plan.graders]
        except HandedBack:
            self._stopped(job, use)
            return False
        except BudgetExceeded:
            self._stopped(job, use)
            self._finished_ready.set()  # the recorder ends the run once what finished is recorded
            return False
        except asyncio.CancelledError:
            self._stopped(job, use)
            raise
        finished = FinishedJob(
            job=job,
            item_id=item.id,
            output=output,
            grades=grades,
            cached=use.output_cached,
            recorded=replays_records(plan.target),
            cache_writes=use.writes,
            cache_hits=use.hits,
            human_verdicts=item.human_verdicts,
            extra_cost_usd=use.warmup_usd,
        )
        if into is None:
            self._hand_over([finished])
        else:
            into.append(finished)
            self._calling[job.run_id] += 1  # done once `_hand_over_part` hands it over
        return True

    def _done_calling(self, run_id: str) -> None:
        """A job that started its calls is done with them: the last one of a run ending over a limit
        wakes the recorder, which ends the run once what finished is recorded."""
        self._calling[run_id] -= 1
        if self._calling[run_id] <= 0:
            del self._calling[run_id]
            if run_id in self._over_limit:
                self._finished_ready.set()

    def _finishing(self, run_id: str) -> bool:
        """Whether a run ending over a limit still waits for jobs that started their calls before it."""
        return self._over_limit[run_id].started_jobs_finish and run_id in self._calling

    def _stopped(self, job: ClaimedJob, use: CacheUse) -> None:
        """A job stopped without a result: what its answered calls cost is kept to be written. When its
        run is ending over a limit (its budget), with the run's end, in its cost_usd (a run stopped at its
        $5 budget after 8 answered $1 calls recorded cost_usd 0, and a restarted server's tenant budget,
        read back from the runs' cost_usd, forgot them). Otherwise (its run cancelled or deleted, a
        shutdown) in its tenant's spend alone (`tenant_run_totals.spent_usd`), which its budget counts
        though no run's cost_usd holds it (a tenant that cancelled runs spent $47-58 against a $20 budget
        across restarts)."""
        if use.spent_usd <= 0:
            return
        if job.run_id in self._over_limit:
            tenant, usd = self._stopped_spend.get(job.run_id, (job.tenant, 0.0))
            self._stopped_spend[job.run_id] = (tenant, usd + use.spent_usd)
        else:
            self._unwritten_spend[job.tenant] += use.spent_usd
            self._finished_ready.set()  # the recorder writes it

    def _unwritten(self, run_id: str) -> None:
        """A run's stopped jobs' spend that will not be written with its end (it ended otherwise, or the
        server stops first): its tenant's spend alone instead."""
        tenant, usd = self._stopped_spend.pop(run_id, ("", 0.0))
        if usd > 0:
            self._unwritten_spend[tenant] += usd

    async def _write_stopped_spend(self) -> None:
        """Add what jobs stopped without a result spent to their tenants' spend, in a transaction of its own
        (never in a recording's, whose batch may be split and retried in parts). Kept to be written again
        only when the database could not take it: then nothing committed."""
        spend, self._unwritten_spend = self._unwritten_spend, defaultdict(float)
        try:
            await self._db.transact(functools.partial(usage.add_to_totals, spent_usd=spend))
        except Exception as exc:
            if unavailable_cause(exc) is not None or is_conflict(exc):
                for tenant, usd in spend.items():
                    self._unwritten_spend[tenant] += usd
            raise

    async def _respond(self, job: ClaimedJob, plan: RunPlan, item: item_pb2.Item, use: CacheUse) -> item_pb2.Response:
        """The target's output: from the response cache when the run reads it and has it (no warmups,
        no call, no spend), else from the target (stored for the cache when the run writes it)."""
        key = None
        if plan.cache_mode in cache.USED:
            key = cache.target_key(plan.tenant, plan.target_spec, item, job.repetition)
        if key is not None and plan.cache_mode in cache.READS:
            try:
                entry = await self._lookup(job, plan, key, "output")
            except cache.LookupFailed as exc:
                raise TargetError(self._unavailable_reason(exc)) from None
            if entry is not None:
                use.output_cached = True
                use.hits.append(key)
                return item_pb2.Response.FromString(entry.payload)
            if plan.cache_mode == cache_pb2.CACHE_MODE_REPLAY:
                raise TargetError(
                    f"{cache.MISS_REASON}: no cached output for item {item.id!r} repetition {job.repetition} "
                    "(the run replays the cache and makes no call)"
                )
        spends = not replays_records(plan.target)
        if job.repetition == 1 and spends:
            for _ in range(plan.warmup_runs):
                use.warmup_usd += self._spend(plan, (await plan.target.respond(item)).cost_usd, use)
        started = time.perf_counter()
        try:
            output = await plan.target.respond(item)
        finally:  # failed and timed-out calls are the latencies operators most need to see
            self._metrics.target_called(plan.target, time.perf_counter() - started)
        if spends:
            self._spend(plan, output.cost_usd, use)
        if key is not None and plan.cache_mode in cache.WRITES:
            use.writes.append(
                CacheEntry(plan.tenant, key, CACHE_TARGET_OUTPUT, output.SerializeToString(), output.cost_usd)
            )
        return output

    async def _grade(
        self,
        job: ClaimedJob,
        plan: RunPlan,
        grader: CompiledGrader | LlmJudgeGrader,
        item: item_pb2.Item,
        output: item_pb2.Response,
        use: CacheUse,
        held_up: Callable[[], AbstractAsyncContextManager[None]],
    ) -> Grade:
        """One grader's grade of the output. A grader that raises (a bug, or a reply no check foresaw)
        costs its own evaluation, ERROR with its reason: it used to fail the item's every grader as a
        target failure and drop the output, its cost and latency with them."""
        started = time.perf_counter()
        try:
            if isinstance(grader, LlmJudgeGrader):
                grade = await self._judge_verdict(job, plan, grader, item, output, use)
            elif offloads(grader, item, output):  # big output: off the event loop, under a time limit
                async with held_up():
                    grade = await self._grading.grade(plan.tenant, grader, item, output)
            else:
                grade = grader.grade(item, output)
        except (BudgetExceeded, asyncio.CancelledError, HandedBack):
            raise
        except Exception as exc:
            log.warning("grader %r of run %s failed on item %r", grader.name, job.run_id, item.id, exc_info=True)
            grade = grader_failed_grade(exc, public_text(exc))
        self._metrics.graded(grader, time.perf_counter() - started)
        return grade

    async def _lookup(self, job: ClaimedJob, plan: RunPlan, key: str, kind: str) -> CacheEntry | None:
        """The run's cache entry under key, or None. A lookup the database cannot answer is a miss for a
        READ_WRITE run (the cache only saves calls: the target or judge is called). A REPLAY run makes
        no call: its job is handed back (`HandedBack`) and runs again when its lease expires; at attempt
        MAX_CACHE_LOOKUP_ATTEMPTS, or at any attempt when the failure is not a passing one (no
        `unavailable_cause`), LookupFailed is raised (the evaluation is ERROR `CACHE_UNAVAILABLE`).
        `ResponseCache` logged the failure for operators."""
        try:
            entry = await self._cache.get(plan.tenant, key)
        except cache.LookupFailed as exc:
            self._metrics.cache_lookups.labels(kind, "failed").inc()
            if plan.cache_mode != cache_pb2.CACHE_MODE_REPLAY:
                return None
            if exc.transient and job.attempt < MAX_CACHE_LOOKUP_ATTEMPTS:
                log.warning(
                    "job %d of run %s could not read the response cache (%s); it runs again when its lease expires",
                    job.id,
                    job.run_id,
                    exc.reason,
                )
                raise HandedBack from None
            raise
        self._metrics.cache_lookups.labels(kind, "miss" if entry is None else "hit").inc()
        return entry

    @staticmethod
    def _unavailable_reason(exc: cache.LookupFailed) -> str:
        return (
            f"{CACHE_UNAVAILABLE}: the run replays the response cache, and the database could not answer its "
            f"lookup ({exc.reason}), so no output was read and no call was made"
        )

    async def _judge_verdict(
        self,
        job: ClaimedJob,
        plan: RunPlan,
        judge: LlmJudgeGrader,
        item: item_pb2.Item,
        output: item_pb2.Response,
        use: CacheUse,
    ) -> Grade:
        """A judge's verdict: from the response cache when the run reads it and has it, else asked
        (and stored for the cache when the run writes it and the judge gave a verdict)."""
        key = judge.cache_key(plan.tenant, item, output) if plan.cache_mode in cache.USED else None
        if key is not None and plan.cache_mode in cache.READS:
            try:
                entry = await self._lookup(job, plan, key, "verdict")
            except cache.LookupFailed as exc:
                reason = self._unavailable_reason(exc)
                return Grade(run_pb2.RESULT_STATE_ERROR, 0.0, 0.0, "the response cache could not be read", reason)
            if entry is not None:
                use.hits.append(key)
                return cache.cached_verdict(entry.payload)
            if plan.cache_mode == cache_pb2.CACHE_MODE_REPLAY:
                return Grade(
                    run_pb2.RESULT_STATE_ERROR,
                    0.0,
                    0.0,
                    "no cached verdict of this judge for this output",
                    f"{cache.MISS_REASON}: no cached verdict of judge {judge.name!r} for item {item.id!r} "
                    "(the run replays the cache and makes no call)",
                )
        grade = await judge.grade_async(item, output)
        self._spend(plan, grade.cost_usd, use)
        if key is not None and plan.cache_mode in cache.WRITES and grade.state != run_pb2.RESULT_STATE_ERROR:
            use.writes.append(
                CacheEntry(plan.tenant, key, CACHE_JUDGE_VERDICT, cache.verdict_payload(grade), grade.cost_usd)
            )
        return grade

    def _check_budget(self, job: ClaimedJob, plan: RunPlan, use: CacheUse) -> None:
        """Raise BudgetExceeded (and mark the run) when the run's or the tenant's budget is spent, or when
        the run is ending over a limit - unless over its stored bytes with this job's calls under way: it
        finishes (`OverLimit.started_jobs_finish`). A job passing its first guard counts as calling."""
        over = self._over_limit.get(job.run_id)
        if over is not None and not (over.started_jobs_finish and use.calling):
            raise BudgetExceeded
        budget = self._settings.tenant_budget_usd
        if plan.max_cost_usd is not None and plan.spent_usd >= plan.max_cost_usd:
            message = (
                f"the run's spend reached ${plan.spent_usd:.4f} of its ${plan.max_cost_usd:.4f} budget, so no"
                " further call started (calls already answered then are in its cost_usd)"
            )
        elif budget > 0 and self._tenant_spent.get(plan.tenant, 0.0) >= budget:
            message = (
                f"the tenant's spend reached its ${budget:.2f} budget (--tenant-budget-usd), so no further call started"
            )
        else:
            if not use.calling:
                use.calling = True
                self._calling[job.run_id] += 1
            return
        if over is None:  # a run ending over its stored bytes keeps that ending; this job stops all the same
            self._over_limit[job.run_id] = OverLimit("BUDGET_EXCEEDED", message)
        raise BudgetExceeded

    async def _over_storage(self, job: ClaimedJob, plan: RunPlan) -> bool:
        """Whether the job's run is ending (over a limit), or its tenant stores the bytes it may: then the
        run is marked to end (STORAGE_QUOTA_EXCEEDED) and no job of it starts. Checked as each job starts,
        so a tenant passes its bytes by at most what the jobs already started then store (and, with
        replicas, what the others recorded since the last read). A count that says the tenant is over is
        read again first: it may be stale (a dataset deleted since), and a run stopped is not resumed."""
        if job.run_id in self._over_limit:
            return True
        limit = self._settings.max_stored_bytes_per_tenant
        if self._tenant_stored.get(plan.tenant, 0) < limit:
            return False
        try:
            async with self._db.read() as conn:
                self._tenant_stored.update(await usage.stored_bytes(conn, [plan.tenant]))
        except Exception as exc:
            if unavailable_cause(exc) is None:
                raise
            return False  # the bound is soft by a job: the next job start reads again
        if job.run_id in self._over_limit:  # marked while this read waited
            return True
        held = self._tenant_stored[plan.tenant]
        if held < limit:
            return False
        self._over_limit[job.run_id] = OverLimit(
            "STORAGE_QUOTA_EXCEEDED",
            f"the tenant stores {held} bytes, its limit of {limit} ({flag_name('max_stored_bytes_per_tenant')}), "
            "so no further evaluation started: delete runs or datasets to make room (a deleted run counts until "
            "it is purged)",
            started_jobs_finish=True,
        )
        log.info(
            "run %s ends over its tenant's stored bytes (%d of %d) once its %d jobs with calls under way are recorded",
            job.run_id,
            held,
            limit,
            self._calling.get(job.run_id, 0),
        )
        return True

    def _spend(self, plan: RunPlan, usd: float, use: CacheUse) -> float:
        """Count a call's cost against the run's and the tenant's budgets, and as its job's (`use`); what
        was counted. Replies are checked where they are read (`targets.reported_amount`); a NaN or negative
        amount that got past would switch the budgets off for good (NaN >= budget is never true), so it is
        never added."""
        if not 0 < usd < math.inf:
            return 0.0
        plan.spent_usd += usd
        use.spent_usd += usd
        self._tenant_spent[plan.tenant] = self._tenant_spent.get(plan.tenant, 0.0) + usd
        return usd

    async def _fail_unexecutable(self, job: ClaimedJob, exc: Exception) -> None:
        """End a run that no attempt could load (e.g. a definition this version cannot build), so its
        watchers are not left waiting forever."""
        log.error("run %s cannot be executed after %d attempts: %s", job.run_id, job.attempt, exc)
        nothing = RunGraders(grader_names=[], weights=[], pass_threshold=None)
        reason = f"the run cannot be executed: {type(exc).__name__}: {public_text(exc)}"
        self._publish_end(
            job.run_id, await fail_early(self._db, job.tenant, job.run_id, nothing, "RUN_NOT_EXECUTABLE", reason)
        )

    def _publish_end(self, run_id: str, end: EarlyEnd) -> None:
        """Hand watchers the end `fail_early` committed: its event; or, when it found the run ended, a
        wake-up that reads the end from the log (an earlier try may have committed it and lost the
        answer, so it was never announced here; a run ended otherwise is only read once more)."""
        self._bus.publish(run_id, [end.event] if end.event is not None else None)

    @staticmethod
    def _target_failed(plan: RunPlan, reason: str) -> tuple[item_pb2.Response, list[tuple[str, Grade]]]:
        grade = target_error_grade(reason)
        return item_pb2.Response(), [(g.name, grade) for g in plan.graders]

    def created(self, run: CreatedRunInputs) -> None:
        """A run this process just created (committed): keep what its plan is built from, so its first
        claim builds the plan without reading back the row and items CreateRun just wrote, then look
        for its jobs. Bounded: inputs another replica ends up executing are dropped, oldest first. A
        stopped executor takes nothing (it reads runs back if it starts again), and neither does one
        with no workers (an API-only replica: other replicas execute its runs, so it would only hold
        their inputs until the bound pushed them out)."""
        if self._stopping or self._settings.workers == 0:
            return
        self._created[run.run_id] = run
        self._created_items += len(run.items)
        while self._created_items > MAX_CREATED_ITEMS and len(self._created) > 1:
            self._take_created(next(iter(self._created)))
        self.wake()

    def _take_created(self, run_id: str) -> CreatedRunInputs | None:
        """Remove and return a run's handed-over plan inputs, if this executor still holds them."""
        inputs = self._created.pop(run_id, None)
        if inputs is not None:
            self._created_items -= len(inputs.items)
        return inputs

    async def _plan(self, run_id: str) -> RunPlan:
        task = self._plans.get(run_id)
        if task is None:
            inputs = self._take_created(run_id)
            if inputs is not None:
                task = asyncio.create_task(self._build_plan(inputs.tenant, inputs.spec, inputs.items, 0.0))
            else:
                task = asyncio.create_task(self._load_plan(run_id))
            self._plans[run_id] = task
        try:
            return await asyncio.shield(task)
        except Exception:
            self._plans.pop(run_id, None)
            raise

    async def _load_plan(self, run_id: str) -> RunPlan:
        async with self._db.read() as conn:
            row = await run_store.get_any_tenant(conn, run_id)
            items = await job_store.run_items(conn, run_id)
        if row is None:
            raise LookupError(f"run {run_id} vanished")
        return await self._build_plan(row.tenant, row.spec, items, row.cost_usd)

    async def _build_plan(self, tenant: str, spec_bytes: bytes, items: Sequence[bytes], spent_usd: float) -> RunPlan:
        """A run's plan from its stored definition and items (`spent_usd`: what it has spent so far)."""
        # The tenant's spend as committed: read with its first plan here, and with each plan on PostgreSQL,
        # where other replicas spend too (see `_refresh_tenant_totals`); kept as the larger of what it read
        # and what this process counted (another plan of the tenant may have read it meanwhile, and spent).
        if self._settings.tenant_budget_usd > 0 and (tenant not in self._tenant_spent or not self._db.is_sqlite):
            async with self._db.read() as conn:
                committed = (await usage.spend(conn, [tenant]))[tenant]
            self._tenant_spent[tenant] = max(committed, self._tenant_spent.get(tenant, 0.0))
        if tenant not in self._tenant_stored:
            async with self._db.read() as conn:
                self._tenant_stored.update(await usage.stored_bytes(conn, [tenant]))
        spec = run_pb2.Run.FromString(spec_bytes)
        named = run_secret_refs(spec.target, spec.graders)
        secrets = await self._secrets.values(tenant, [name for _, name in named])
        graders = [self._compile(g, secrets) for g in spec.graders]
        run_items = [item_pb2.Item.FromString(raw) for raw in items]
        return RunPlan(
            tenant=tenant,
            items=run_items,
            target=build_target(spec.target, self._outbound, self._prices, secrets),
            graders=graders,
            warmup_runs=spec.warmup_runs,
            recorder_view=RunGraders(
                grader_names=[g.name for g in graders],
                weights=[g.weight for g in graders],
                pass_threshold=spec.pass_threshold if spec.HasField("pass_threshold") else None,
                max_error_rate=spec.max_error_rate if spec.HasField("max_error_rate") else None,
            ),
            max_cost_usd=spec.max_cost_usd if spec.HasField("max_cost_usd") else None,
            spent_usd=spent_usd,
            offloads_grading=may_offload([g for g in graders if not isinstance(g, LlmJudgeGrader)], run_items),
            target_spec=spec.target,
            cache_mode=spec.cache_mode,
        )

    def _compile(self, spec: grader_pb2.Grader, secrets: Mapping[str, str]) -> CompiledGrader | LlmJudgeGrader:
        if spec.WhichOneof("kind") == "llm_judge":
            return LlmJudgeGrader(
                grader_name(spec),
                spec.weight or 1.0,
                spec.llm_judge,
                self._outbound,
                self._judge,
                self._prices,
                secrets,
            )
        return compile_grader(spec)

    def _forget(self, run_id: str) -> None:
        """Drop a run's plan (and the inputs of one not built yet). A load still in progress is left
        to finish, never cancelled: other callers may be awaiting it (through `asyncio.shield`), and a
        cancelled shared load raised `CancelledError` in each of them - in the claim loop too."""
        self._plans.pop(run_id, None)
        self._take_created(run_id)

    async def _record_loop(self) -> None:
        """Record batch after batch; beats after each turn it completes, not as it (re)starts (see
        `_claim_loop`): a recording that fails every time is no progress."""
        progress = self._progress["record"]
        while True:
            if self._unwritten_spend:
                await self._write_stopped_spend()
            if not self._finished:
                if self._over_limit:
                    await self._end_over_limit_runs()
                if self._stopping:
                    return
                self._finished_ready.clear()
                endable = any(not self._finishing(run_id) for run_id in self._over_limit)
                if not self._finished and not endable and not self._unwritten_spend:
                    await self._finished_ready.wait()  # `_done_calling` wakes it for a run that waited
                progress.beat()
                continue
            batch_jobs = self._settings.claim_batch
            batch, self._finished = self._finished[:batch_jobs], self._finished[batch_jobs:]
            self._recorded.set()
            views = {}
            retry = False
            try:
                for f in batch:
                    if f.job.run_id not in views:
                        views[f.job.run_id] = (await self._plan(f.job.run_id)).recorder_view
                events, finished_runs = await record(self._db, batch, views, cache_bounds=self._cache_bounds)
            except Exception as exc:
                # The database cannot take it now (down, out of connections, a lock timeout) or lost a
                # race: the batch goes back first in line, its leases still kept, and is recorded when
                # the restarted loop reaches it; run again instead, its model calls would be paid twice.
                retry = unavailable_cause(exc) is not None or is_conflict(exc)
                if retry:
                    self._finished[:0] = batch
                # Parts of a split batch may have committed before the failure: their events were never
                # handed to watchers here, who then waited for good (heartbeats, no end). They read the
                # log instead.
                for run_id in {f.job.run_id for f in batch}:
                    self._bus.publish(run_id, None)
                raise
            finally:
                # Otherwise, recorded or not, the batch's leases are no longer renewed: jobs of a batch
                # that could not be recorded run again when their leases expire, not stay leased for good.
                if not retry:
                    for f in batch:
                        self._release_claim_slot(f.job.claim_id)
            self._metrics.evaluations_recorded(events)
            for f in batch:
                if f.job.run_id in events and f.job.tenant in self._tenant_stored:
                    self._tenant_stored[f.job.tenant] += stored_bytes(f)
            for run_id, run_events in events.items():
                self._bus.publish(run_id, run_events)
            await self._end_over_limit_runs()
            for run_id in views:
                if run_id in finished_runs or run_id not in events:
                    self._forget(run_id)
            progress.beat()

    async def _end_over_limit_runs(self) -> None:
        """Fail the runs that hit their budget or their tenant's stored bytes, once what they finished
        before it is recorded - for the stored bytes, also what the jobs that had started their calls
        then finish (`OverLimit.started_jobs_finish`: docs/errors.md promises they are recorded; stopped,
        their paid calls were thrown away, one in 40 under load).

        Their other jobs still working stop first, before the runs end, rather than after (each would be
        refused at its next call): what their answered calls cost is then known (`_stopped`) and written
        with the run's end, so its terminal event and GetRun show the same cost_usd. Calls they had in
        flight are abandoned, and in no cost_usd. The jobs of every such run are stopped at once and waited for once:
        waited for run by run, 20 runs ended together took up to 20 times STOP_WAIT_S."""
        waiting = {f.job.run_id for f in self._finished}
        ending = [run_id for run_id in self._over_limit if run_id not in waiting and not self._finishing(run_id)]
        tasks = [task for run_id in ending for task in self._in_flight.get(run_id, ())]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            waiting = {f.job.run_id for f in self._finished}  # one finished as it was stopped: recorded first
        for run_id in ending:
            if run_id in waiting or run_id not in self._over_limit:
                continue
            try:
                plan = await self._plan(run_id)
            except LookupError:  # deleted and purged meanwhile: nothing is left to end
                self._give_up_ending(run_id)
                continue
            over = self._over_limit[run_id]
            if over.end_time is None:  # the first try fixes the ending (see OverLimit)
                tenant, carried = self._stopped_spend.pop(run_id, (plan.tenant, 0.0))
                over = self._over_limit[run_id] = over.ending(tenant, carried)
            end = await fail_early(
                self._db,
                plan.tenant,
                run_id,
                plan.recorder_view,
                over.code,
                over.message,
                spent_usd=over.carried_usd,
                end_time=over.end_time,
            )
            del self._over_limit[run_id]
            if not end.ours and over.carried_usd > 0:  # it had ended otherwise (cancelled): not in its cost_usd
                self._unwritten_spend[over.tenant] += over.carried_usd
            self._unwritten(run_id)  # what jobs handed over after the first try is in no cost_usd either
            self.run_ended(run_id)
            self._publish_end(run_id, end)

    def _give_up_ending(self, run_id: str) -> None:
        """Forget a run that will not be ended here (purged; the server stops). What its stopped jobs spent
        goes to the tenant's spend alone, the amount a try carried too: whether that try committed is
        not known (PostgreSQL may have lost the answer), and a database that failed is likelier than a
        lost answer, so it may count twice rather than not at all."""
        over = self._over_limit.pop(run_id)
        if over.carried_usd > 0:
            self._unwritten_spend[over.tenant] += over.carried_usd
        self._unwritten(run_id)

    async def _keep_leases(self) -> None:
        interval = self._settings.lease_ttl_s / 3
        progress = self._progress["leases"]
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), interval)
            if self._open_claims and not self._stopping:
                await self._extend_leases()
            if self._plans and not self._stopping:
                await self.sweep_plans()
                await self._refresh_tenant_totals()
            progress.beat()  # after the turn, not as the loop (re)starts (see `_claim_loop`)

    async def sweep_plans(self) -> None:
        """End the work on, and forget the plans of, runs that ended without this process hearing of it.

        A run's end reaches this process through `run_ended` (its own cancel, or EventListener relaying
        another replica's); one ended while the listening connection was down is never announced again,
        and its plan (its items, the secret values it opened) would stay for good. So, every lease
        interval, the runs whose plans are held are checked in one read: plans are held only for runs
        this process has claimed jobs of, so the read stays small, and a plan is dropped within one
        interval of its run's end however the news was lost."""
        async with self._db.read() as conn:
            ended = await run_store.ended_among(conn, list(self._plans))
        for run_id in ended:
            self.run_ended(run_id)

    async def _refresh_tenant_totals(self) -> None:
        """Read again the stored bytes of the tenants whose plans are held (other replicas' recordings,
        DeleteDataset and purges change them too); the others' may be stale, and are read again before
        they stop a run (`_over_storage`).

        With PostgreSQL replicas and a tenant budget, read their spend again too: each replica counted
        what it read with its first run of the tenant plus what it spent itself, so two replicas let a
        tenant spend twice its budget ($38 of $20). The count kept is the larger of this process's and
        the committed one: what this process spent and has not committed yet is in the first, what the
        others committed in the second, so a tenant's spend is never counted twice (a commit between the
        read and the comparison would be), at worst short by this process's spend not yet committed."""
        tenants = sorted(
            {
                task.result().tenant
                for task in self._plans.values()
                if task.done() and not task.cancelled() and task.exception() is None
            }
        )
        if not tenants:
            return
        shared_budget = self._settings.tenant_budget_usd > 0 and not self._db.is_sqlite  # SQLite has one server
        committed: dict[str, float] = {}
        async with self._db.read() as conn:
            self._tenant_stored.update(await usage.stored_bytes(conn, tenants))
            if shared_budget:
                committed = await usage.spend(conn, tenants)
        for tenant, usd in committed.items():
            self._tenant_spent[tenant] = max(self._tenant_spent.get(tenant, 0.0), usd)

    async def _extend_leases(self) -> None:
        """Keep the leases of the claims still being worked on for another lease_ttl_s."""
        await self._db.transact(
            functools.partial(
                job_store.extend, claim_ids=list(self._open_claims), expiry=time.time() + self._settings.lease_ttl_s
            )
        )
