"""Worker processes: work the event loop must not do, in a process that can be killed.

Some work holds the GIL for its whole length (json parsing, protobuf's parse of a large map), so a
thread does not keep the loop free, and a thread cannot be stopped. A process can: the server's
grading workers (evalsvc.graders.pool), its checker of large requests (evalsvc.api.decoding) and its
parser of endpoints' large JSON replies (evalsvc.http.json_bodies) are all `Worker`s, a `python -m
<module>` whose module calls `serve`; the last two, one process each used one request at a time, are
`LoneWorker`s.

Both sides speak length-prefixed frames (a 4-byte big-endian length, then the bytes) over the
child's stdin and stdout, one request and its reply at a time. The child first writes one ready
byte, once its imports are done, so that no request's time limit pays for them. It dies with its
parent (Linux: PR_SET_PDEATHSIG), so a server killed with -9 leaves no runaway work behind, and it
runs at a lower priority than the server, whose loop answers people.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# A worker imports protobuf (and a grader's libraries) before it says it is ready; on a loaded machine
# that takes seconds, and it counts against no request's limit.
START_TIMEOUT_S = 60.0
# When the cores are busy the kernel should run the server's loop first (nice 10 gets about a tenth of
# the CPU share of nice 0 under CFS).
NICENESS = 10
_FRAME = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
_READY = b"R"


class WorkerGone(Exception):
    """The worker process died (or broke its pipe) before it answered; killed and reaped since."""


class Worker:
    """One worker process and its pipes; used by one request at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, module: str) -> Worker:
        """`python -m module`, once it has said it is ready (OSError, EOFError or TimeoutError if it cannot)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        worker = cls(process)
        try:
            assert process.stdout is not None
            await asyncio.wait_for(process.stdout.readexactly(len(_READY)), START_TIMEOUT_S)
        except BaseException:
            await worker.kill()
            raise
        return worker

    @property
    def alive(self) -> bool:
        """Whether the process has not exited (as far as the loop has heard: its exit is noticed within
        a loop iteration or two). An idle worker killed meanwhile (the OOM killer, an operator) must not
        take the next request: it would fail for nothing of its own."""
        return self.process.returncode is None

    async def exchange(self, request: bytes) -> bytes:
        """Send one request and wait for its reply (OSError or EOFError when the process is gone)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(_FRAME.pack(len(request)) + request)
        await self.process.stdin.drain()
        (size,) = _FRAME.unpack(await self.process.stdout.readexactly(_FRAME.size))
        return await self.process.stdout.readexactly(size)

    async def call(self, request: bytes, timeout_s: float) -> Any:
        """The unpickled reply to `request`, within `timeout_s`. The process is killed (and reaped) when
        the reply does not come in time (TimeoutError), when it died or answered what does not unpickle
        (WorkerGone), and when the caller is cancelled meanwhile: its reply would be read by the next
        request."""
        try:
            return pickle.loads(await asyncio.wait_for(self.exchange(request), timeout_s))
        except TimeoutError:
            await self.kill()
            raise
        except (OSError, EOFError, pickle.UnpicklingError) as exc:  # asyncio.IncompleteReadError is an EOFError
            await self.kill()
            raise WorkerGone(f"{type(exc).__name__}, exit code {self.process.returncode}") from exc
        except BaseException:
            await asyncio.shield(self.kill())
            raise

    async def kill(self) -> None:
        """Stop the process at once, whatever it is computing, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()


class LoneWorker:
    """One worker process for requests taken one at a time (their callers take turns): started on first
    need and kept while it behaves; a request that times out, kills it or is abandoned stops it (`Worker.call`),
    and the next request starts another. Once closed, none is started."""

    def __init__(self, module: str, purpose: str) -> None:
        self._module = module
        self._purpose = purpose  # what the process is for, in log lines: "checks large requests"
        self._worker: Worker | None = None
        self._closed = False

    async def call(self, request: bytes, timeout_s: float) -> Any:
        """The worker's unpickled reply to `request` (`Worker.call`): TimeoutError past `timeout_s`,
        WorkerGone when the process died, could not start, or this is closed."""
        if self._closed:
            raise WorkerGone("stopped with the server")
        if self._worker is not None and not self._worker.alive:
            gone, self._worker = self._worker, None
            await gone.kill()  # reaped already: returns at once
            log.warning(
                "the process that %s exited while idle (exit code %s); starting another",
                self._purpose,
                gone.process.returncode,
            )
        if self._worker is None:
            try:
                started = await Worker.start(self._module)
            except (OSError, EOFError, TimeoutError) as exc:
                if self._closed:  # killed by the server's stop while it started
                    raise WorkerGone("stopped with the server") from None
                log.error("cannot start the process that %s: %s", self._purpose, exc)
                raise WorkerGone(f"it did not start: {exc}") from None
            if self._closed:  # closed while it started: `close` found no process to stop
                await started.kill()
                raise WorkerGone("stopped with the server")
            self._worker = started
        worker = self._worker
        try:
            return await worker.call(request, timeout_s)
        except WorkerGone as exc:
            if not self._closed:
                log.warning("the process that %s died: %s", self._purpose, exc)
            raise
        finally:
            if worker.process.returncode is not None and self._worker is worker:  # killed: the next starts one
                self._worker = None

    async def close(self) -> None:
        """Stop the worker, busy or not (its request ends WorkerGone), and start no other."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.kill()


def serve(handle: Callable[[bytes], bytes]) -> None:
    """The worker's side: answer each request with `handle`'s reply until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the server, which stops us
    _die_with_parent()
    os.nice(NICENESS)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    replies.write(_READY)
    replies.flush()
    while True:
        head = requests.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        (size,) = _FRAME.unpack(head)
        reply = handle(requests.read(size))
        replies.write(_FRAME.pack(len(reply)) + reply)
        replies.flush()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies; elsewhere, stdin closing ends it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
