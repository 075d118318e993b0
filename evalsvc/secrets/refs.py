"""Where a run names secrets: its target's endpoint and its judges' endpoints."""

from __future__ import annotations

from collections.abc import Sequence

from evalsvc.graders.judge import judge_secret_refs
from evalsvc.targets import target_secret_refs
from evalsvc.v1 import grader_pb2, target_pb2


def run_secret_refs(target: target_pb2.Target, graders: Sequence[grader_pb2.Grader]) -> list[tuple[str, str]]:
    """(field, name) of every secret a run's (resolved) target and graders name, with CreateRun's field paths."""
    refs = target_secret_refs(target, "target")
    for i, grader in enumerate(graders):
        refs += judge_secret_refs(grader, f"graders[{i}]")
    return refs
