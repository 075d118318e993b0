"""A grading worker process (`python -m evalsvc.graders.worker`), started by evalsvc.graders.pool.

Each request is a pickled `(grader spec, item, output)`, each reply the pickled `Grade`, over the
pipes of evalsvc.workers (which also has it die with its parent and run at a lower priority).
Compiled graders are cached by spec, since a run sends the same few specs many times.
"""

from __future__ import annotations

import functools
import pickle

from evalsvc.graders.builtin import CompiledGrader, compile_grader
from evalsvc.v1 import grader_pb2, item_pb2
from evalsvc.workers import serve


@functools.lru_cache(maxsize=64)
def _compiled(spec_bytes: bytes) -> CompiledGrader:
    return compile_grader(grader_pb2.Grader.FromString(spec_bytes))


def _grade(request: bytes) -> bytes:
    spec_bytes, item_bytes, output_bytes = pickle.loads(request)
    grade = _compiled(spec_bytes).grade(
        item_pb2.Item.FromString(item_bytes), item_pb2.Response.FromString(output_bytes)
    )
    return pickle.dumps(grade)


def main() -> None:
    """Serve gradings until stdin closes."""
    serve(_grade)


if __name__ == "__main__":
    main()
