"""Grading off the event loop: expensive gradings run in worker processes, under a time limit.

Built-in graders are pure functions, cheap on ordinary outputs but not always: similarity is
quadratic in the text, JSON parsing and comparison hold the GIL for their whole length, a `contains`
grader searches the text once per value (tens of thousands of values is half a second on 16 KB),
and an RE2 pattern whose DFA gives up costs its program's size per character (a valid 50-character
pattern, 80-100 ms on 16 KB). Graded on the event loop, one tenant's grading would stall every RPC,
watcher and health check.

So each grading's cost is estimated before it runs: the text it reads (output plus expected output;
for `tool_calls`, the whole output with its calls) times the grader's per-character factor, worked
out once when the grader is compiled from its config (a regex's RE2 program size, a `contains`
grader's number of values, a `tool_calls` grader's expected arguments; similarity is quadratic), and
per item where the item carries the pattern (`CompiledGrader.cost_ns`, the measurements are in
evalsvc.graders.builtin). A grading estimated over `INLINE_BUDGET_NS` (about a millisecond) is sent
to one of `--grade-processes` worker processes (`python -m evalsvc.graders.worker`): `offloads`.
Everything else stays inline, where it costs at most about that and a pipe round trip would cost more
than the grading. A per-item pattern is compiled on the loop only when it is plain (short, few
repetitions, no Unicode classes) and within a small RE2 memory bound; any other is compiled by the
worker that grades it, so a bad item pattern costs the loop microseconds, not tens of milliseconds.
A run whose gradings may be sent to a worker (`may_offload`: the same estimate over each item's
whole size) does not execute inline on the claim loop, which would wait on them.

Why processes and not threads: json holds the GIL through a whole parse (measured: the loop thread
stalled 140 ms behind one 13 MB `json.loads` in a thread; RE2 and rapidfuzz release it), and a
thread cannot be stopped. A process can: when a grading exceeds `--grade-timeout-s` its worker is
killed (SIGKILL) and the evaluation becomes ERROR `GRADER_TIMEOUT`; a new worker is started for the
next grading. So a runaway computation costs at most the time limit of one worker, never more.

The time limit counts the grading only: waiting for a free worker is not the grading's fault. The
wait is bounded too, since each grading ahead takes at most the limit, and fair: free workers go to
waiting tenants in turn (round-robin, `evalsvc.slots.Slots`, as an endpoint's slots do), so one
tenant's thousand big outputs do not queue ahead of another tenant's one.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING

from evalsvc.graders.builtin import ERROR, CompiledGrader, Grade
from evalsvc.slots import Slots
from evalsvc.v1 import item_pb2
from evalsvc.workers import Worker, WorkerGone

if TYPE_CHECKING:
    from evalsvc.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["INLINE_BUDGET_NS", "GradingPool", "may_offload", "offloads"]

# What a grading may cost inline: about a millisecond (a pipe round trip to a worker and back is
# ~0.1 ms, so cheaper gradings stay inline; estimates in evalsvc.graders.builtin).
INLINE_BUDGET_NS = 1_000_000.0
WORKER_MODULE = "evalsvc.graders.worker"


def _over_budget(grader: CompiledGrader, item: item_pb2.Item, chars: int) -> bool:
    return grader.cost_ns(item, chars) > INLINE_BUDGET_NS


def offloads(grader: CompiledGrader, item: item_pb2.Item, output: item_pb2.Response) -> bool:
    """Whether this grading goes to a worker process: its estimated cost is over the inline budget."""
    read = output.ByteSize() if grader.kind == "tool_calls" else len(output.content)  # tool calls: arguments too
    return _over_budget(grader, item, len(item.expected_output) + read)


def may_offload(graders: Sequence[CompiledGrader], items: Sequence[item_pb2.Item]) -> bool:
    """Whether some grading of a run over these items may go to a worker: the same estimate as
    `offloads`, with the item's whole size (its input, expected output or recorded response make up a
    local target's grading) for the text. Such a run's jobs must not be executed inline on the claim
    loop, which would wait on them."""
    if not items:
        return False
    sized = [(item.ByteSize(), item) for item in items]
    largest = max(sized, key=lambda pair: pair[0])
    # The estimate grows with the text, so the largest item decides for a grader whose factors are
    # its own. One whose factors come from each item (a per-item pattern) may go to a worker whenever
    # an item has one: asking each item's estimate would compile every item's pattern on the loop
    # (100,000 of them, ~27 s), and the answer only keeps the run's jobs off the claim loop.
    return any(
        any(item.expected_output for item in items) if g.item_dependent else _over_budget(g, largest[1], largest[0])
        for g in graders
    )


def _timeout_grade(limit_s: float) -> Grade:
    """The grade of an evaluation whose grading ran out of time."""
    return Grade(
        ERROR,
        0.0,
        0.0,
        f"grading took longer than {limit_s:g} s and was stopped",
        f"GRADER_TIMEOUT: grading exceeded the server's limit of {limit_s:g} s (--grade-timeout-s)",
    )


def _crashed_grade(detail: str) -> Grade:
    """The grade of an evaluation whose grading process died (e.g. killed for memory)."""
    return Grade(ERROR, 0.0, 0.0, "the grading process failed", f"GRADER_CRASHED: {detail}")


class GradingPool:
    """Up to `processes` worker processes, started on first need and kept while they behave."""

    def __init__(self, processes: int, timeout_s: float, metrics: Metrics) -> None:
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._slots = Slots(max(1, processes))  # handed to waiting tenants in turn
        self._idle: list[Worker] = []

    async def grade(self, tenant: str, grader: CompiledGrader, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        """Grade in a worker process within the time limit; never raises but for cancellation."""
        payload = pickle.dumps((grader.spec_bytes, item.SerializeToString(), output.SerializeToString()))
        await self._slots.acquire(tenant)
        try:
            return await self._grade_in_worker(grader, payload)
        finally:
            self._slots.release()

    async def _grade_in_worker(self, grader: CompiledGrader, payload: bytes) -> Grade:
        """One grading on an idle (or new) worker, killed when over the limit or abandoned."""
        try:
            worker = await self._idle_worker() or await Worker.start(WORKER_MODULE)
        except (OSError, EOFError, TimeoutError) as exc:
            log.error("cannot start a grading process: %s", exc)
            return _crashed_grade(f"could not start a grading process ({type(exc).__name__})")
        try:
            grade: Grade = await worker.call(payload, self._timeout_s)
        except TimeoutError:
            self._metrics.grading_timed_out(grader)
            return _timeout_grade(self._timeout_s)
        except WorkerGone as exc:
            log.warning("a grading process died: %s", exc)
            return _crashed_grade(f"the grading process exited ({type(exc.__cause__).__name__})")
        self._idle.append(worker)
        return grade

    async def _idle_worker(self) -> Worker | None:
        """An idle worker still alive, or None; those that exited while idle are reaped and dropped (one
        killed meanwhile failed the next grading GRADER_CRASHED, for nothing of its own)."""
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            await worker.kill()
            log.warning("a grading process exited while idle (exit code %s)", worker.process.returncode)
        return None

    async def close(self) -> None:
        """Stop the idle workers (busy ones are killed by their cancelled gradings)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(worker.kill() for worker in idle))
