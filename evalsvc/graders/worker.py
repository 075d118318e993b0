"""A grading worker process (`python -m evalsvc.graders.worker`), started by evalsvc.graders.pool.

It reads length-prefixed requests `(grader spec, item, output)` on stdin and writes each `Grade` on
stdout, one at a time, until stdin closes. Compiled graders are cached by spec, since a run sends
the same few specs many times. It dies with its parent (Linux), so a server killed with -9 does not
leave a runaway grading behind, and it runs at a lower priority than the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pickle
import signal
import struct
import sys

from evalsvc.graders.builtin import CompiledGrader, compile_grader
from evalsvc.v1 import grader_pb2, item_pb2

_FRAME = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
# Grading is batch work and the server's event loop answers people: when the cores are busy, the
# kernel should run the loop first (nice 10 gets about a tenth of the CPU share of nice 0 under CFS).
NICENESS = 10


@functools.lru_cache(maxsize=64)
def _compiled(spec_bytes: bytes) -> CompiledGrader:
    return compile_grader(grader_pb2.Grader.FromString(spec_bytes))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies; elsewhere, stdin closing ends it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    """Serve gradings until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the server, which stops us
    _die_with_parent()
    os.nice(NICENESS)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    replies.write(b"R")  # ready: imports are done, so no grading's time limit pays for them
    replies.flush()
    while True:
        head = requests.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        (size,) = _FRAME.unpack(head)
        spec_bytes, item_bytes, output_bytes = pickle.loads(requests.read(size))
        grade = _compiled(spec_bytes).grade(
            item_pb2.Item.FromString(item_bytes), item_pb2.Response.FromString(output_bytes)
        )
        reply = pickle.dumps(grade)
        replies.write(_FRAME.pack(len(reply)) + reply)
        replies.flush()


if __name__ == "__main__":
    main()
