"""Grading off the event loop: big outputs are graded in worker processes, under a time limit.

Built-in graders are pure functions, cheap on ordinary outputs but not on large ones: similarity is
quadratic in the text, and JSON parsing and comparison hold the GIL for their whole length. Graded
on the event loop, one tenant's megabyte outputs would stall every RPC, watcher and health check.

So a grading whose text (output plus expected output) exceeds `INLINE_LIMIT_CHARS`, for a grader
that reads the text (all but latency and cost: `offloads`), is sent to one of `--grade-processes`
worker processes (`python -m evalsvc.graders.worker`); everything else stays inline, where it costs
microseconds and a pipe round trip would cost more than the grading. Even the linear graders go:
an endpoint's reply has no size limit, and case-folding 100 MB is a stall too.

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
import contextlib
import logging
import pickle
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from evalsvc.graders.builtin import ERROR, CompiledGrader, Grade
from evalsvc.slots import Slots
from evalsvc.v1 import item_pb2

if TYPE_CHECKING:
    from evalsvc.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["INLINE_LIMIT_CHARS", "GradingPool", "may_offload", "offloads"]

# Below this many characters of text, the heaviest built-in grader (similarity, quadratic over
# 64-bit words) takes about a millisecond: cheaper inline than the round trip to a worker.
INLINE_LIMIT_CHARS = 16 * 1024
# Grader kinds that read the output's text, so whose cost grows with it.
_TEXT_KINDS = frozenset({"exact_match", "contains", "regex", "json_match", "similarity", "tool_calls"})
# A worker imports protobuf, RE2 and rapidfuzz before it says it is ready; on a loaded machine that
# takes seconds, and it does not count against any evaluation's limit.
WORKER_START_TIMEOUT_S = 60.0
_FRAME = struct.Struct("!I")


def offloads(grader: CompiledGrader, item: item_pb2.Item, output: item_pb2.Response) -> bool:
    """Whether this grading goes to a worker process (see the module docstring)."""
    if grader.kind not in _TEXT_KINDS:
        return False
    read = output.ByteSize() if grader.kind == "tool_calls" else len(output.content)  # tool calls: arguments too
    return len(item.expected_output) + read > INLINE_LIMIT_CHARS


def may_offload(graders: Sequence[CompiledGrader], items: Sequence[item_pb2.Item]) -> bool:
    """Whether some grading of a run over these items may go to a worker: a text grader and an item
    (whose input, expected output or recorded response make up a local target's grading) over the
    limit. Such a run's jobs must not be executed inline on the claim loop, which would wait on them."""
    if not any(g.kind in _TEXT_KINDS for g in graders):
        return False
    return any(item.ByteSize() > INLINE_LIMIT_CHARS for item in items)


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


class _Worker:
    """One worker process and its pipes; used by one grading at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "evalsvc.graders.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(process)
        try:
            assert process.stdout is not None
            await asyncio.wait_for(process.stdout.readexactly(1), WORKER_START_TIMEOUT_S)
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def grade(self, payload: bytes) -> Grade:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(_FRAME.pack(len(payload)) + payload)
        await self.process.stdin.drain()
        (size,) = _FRAME.unpack(await self.process.stdout.readexactly(_FRAME.size))
        grade: Grade = pickle.loads(await self.process.stdout.readexactly(size))
        return grade

    async def kill(self) -> None:
        """Stop the process at once, whatever it is computing, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()


class GradingPool:
    """Up to `processes` worker processes, started on first need and kept while they behave."""

    def __init__(self, processes: int, timeout_s: float, metrics: Metrics) -> None:
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._slots = Slots(max(1, processes))  # handed to waiting tenants in turn
        self._idle: list[_Worker] = []

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
            worker = self._idle.pop() if self._idle else await _Worker.start()
        except (OSError, EOFError, TimeoutError) as exc:
            log.error("cannot start a grading process: %s", exc)
            return _crashed_grade(f"could not start a grading process ({type(exc).__name__})")
        try:
            grade = await asyncio.wait_for(worker.grade(payload), self._timeout_s)
        except TimeoutError:
            await worker.kill()
            self._metrics.grading_timed_out(grader)
            return _timeout_grade(self._timeout_s)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:  # asyncio.IncompleteReadError is an EOFError
            await worker.kill()
            log.warning("a grading process died: exit code %s", worker.process.returncode)
            return _crashed_grade(f"the grading process exited ({type(exc).__name__})")
        except BaseException:  # cancelled mid-grading: the worker's reply would be read by the next one
            await asyncio.shield(worker.kill())
            raise
        self._idle.append(worker)
        return grade

    async def close(self) -> None:
        """Stop the idle workers (busy ones are killed by their cancelled gradings)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(worker.kill() for worker in idle))
