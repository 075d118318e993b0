"""Static validation of a grader spec of any kind, at CreateRun, CreateGrader and UpdateGrader.

Apart from `builtin` so that the grading processes, which import only the built-in graders, do not
load the judge and the HTTP client it brings (about 13 MB and half a second more per process).
"""

from __future__ import annotations

from evalsvc.errors import FieldViolation
from evalsvc.graders.builtin import validate_builtin
from evalsvc.graders.judge import validate_judge
from evalsvc.messages.validation import check_definition_size
from evalsvc.v1 import grader_pb2


def validate_grader(spec: grader_pb2.Grader, path: str) -> list[FieldViolation]:
    """Every static problem of a spec, with field paths under `path` (e.g. `graders[2]`); a spec over the
    definition size is refused for that alone, before any of its parts is read (see `validate_target`)."""
    out: list[FieldViolation] = []
    check_definition_size(spec, path, out)
    if out:
        return out
    out = validate_builtin(spec, path)
    if spec.WhichOneof("kind") == "llm_judge":
        out.extend(validate_judge(spec.llm_judge, path))
    return out
