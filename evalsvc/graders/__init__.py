"""Graders: score one target output for one item.

The executor compiles each of a run's `Grader` specs once (`compile_grader`), then calls
`CompiledGrader.grade(item, output)` for every evaluation. Grading is pure and synchronous:
built-in graders do no I/O, so a batch of thousands of evaluations costs no awaits. Only a large
output is graded elsewhere, in a worker process under a time limit (`evalsvc.graders.pool`).

`validate_grader` checks a spec statically at CreateRun, so a run never starts with a grader that
cannot work for any item.
"""

from evalsvc.graders.builtin import (
    CompiledGrader,
    Grade,
    compile_grader,
    grader_name,
    target_error_grade,
    validate_grader,
)

__all__ = [
    "CompiledGrader",
    "Grade",
    "compile_grader",
    "grader_name",
    "target_error_grade",
    "validate_grader",
]
