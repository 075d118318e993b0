"""Graders: score one target output for one item.

The executor compiles each of a run's `Grader` specs once (`compile_grader`), then calls
`CompiledGrader.grade(item, output)` for every evaluation. The built-in graders (`builtin`) are pure
and synchronous: no I/O, so a batch of thousands of evaluations costs no awaits, and a large output
is graded in a worker process under a time limit (`pool`, `worker`). The LLM judge (`judge`) is the
one grader that awaits: it calls a model through evalsvc.http.

`validate_grader` (evalsvc.graders.validation) checks a spec statically at CreateRun, so a run never
starts with a grader that cannot work for any item.
"""

from evalsvc.graders.builtin import (
    CompiledGrader,
    Grade,
    compile_grader,
    grader_failed_grade,
    grader_name,
    target_error_grade,
)

__all__ = [
    "CompiledGrader",
    "Grade",
    "compile_grader",
    "grader_failed_grade",
    "grader_name",
    "target_error_grade",
]
