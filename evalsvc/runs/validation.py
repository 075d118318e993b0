"""Static validation of a CreateRun request: everything that can be checked without the database.

All violations are collected, not just the first, so a caller fixes a request in one round trip.
"""

from __future__ import annotations

import math

from evalsvc.errors import FieldViolation
from evalsvc.graders import grader_name
from evalsvc.graders.validation import validate_grader
from evalsvc.messages.validation import (
    MAX_DESCRIPTION,
    MAX_DISPLAY_NAME,
    MAX_GRADERS,
    MAX_REQUEST_ID,
    check_annotations,
    check_items,
    check_labels,
    check_length,
)
from evalsvc.targets import validate_target
from evalsvc.v1 import cache_pb2, run_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb

MAX_REPETITIONS = 100
MAX_WARMUP_RUNS = 10


async def validate_create_run(request: pb.CreateRunRequest) -> list[FieldViolation]:
    """Every violation in a CreateRun request (inline items must already have their ids assigned).

    How many items and graders a tenant may use is a quota (evalsvc.limits), not validation."""
    out: list[FieldViolation] = []
    check_length(request.request_id, MAX_REQUEST_ID, "request_id", out)
    if request.dataset_id and request.items:
        out.append(FieldViolation("items", "give either dataset_id or items, not both"))
    elif not request.dataset_id and not request.items:
        out.append(FieldViolation("items", "give dataset_id or at least one item"))
    if request.item_ids and not request.dataset_id:
        out.append(FieldViolation("item_ids", "item_ids select from a dataset; dataset_id is missing"))
    await check_items(request.items, "items", out)
    if not request.HasField("target"):
        out.append(FieldViolation("target", "a target is required"))
    else:
        out.extend(validate_target(request.target, "target"))
    if request.HasField("max_cost_usd") and not (math.isfinite(request.max_cost_usd) and request.max_cost_usd >= 0):
        out.append(FieldViolation("max_cost_usd", "must be a finite amount >= 0"))
    if not request.graders:
        out.append(FieldViolation("graders", "at least one grader is required"))
    if len(request.graders) > MAX_GRADERS:
        out.append(FieldViolation("graders", f"at most {MAX_GRADERS} graders"))
    names: set[str] = set()
    for i, grader in enumerate(request.graders):
        out.extend(validate_grader(grader, f"graders[{i}]"))
        name = grader_name(grader)
        if name in names:
            out.append(FieldViolation(f"graders[{i}].name", f"duplicate grader name {name!r}; name each grader"))
        names.add(name)
    check_length(request.display_name, MAX_DISPLAY_NAME, "display_name", out)
    check_length(request.description, MAX_DESCRIPTION, "description", out)
    check_labels(request.labels, "labels", out)
    check_annotations(request.annotations, "annotations", out)
    for percent in ("pass_threshold", "max_error_rate"):
        if request.HasField(percent) and not 0 <= getattr(request, percent) <= 100:  # NaN fails it too
            out.append(FieldViolation(percent, "must be a percentage between 0 and 100"))
    if not 0 <= request.repetitions <= MAX_REPETITIONS:
        out.append(FieldViolation("repetitions", f"must be between 1 and {MAX_REPETITIONS} (0 means 1)"))
    if not 0 <= request.warmup_runs <= MAX_WARMUP_RUNS:
        out.append(FieldViolation("warmup_runs", f"must be between 0 and {MAX_WARMUP_RUNS}"))
    if request.trigger not in run_pb2.Trigger.values():
        out.append(FieldViolation("trigger", "unknown trigger"))
    if request.cache_mode not in cache_pb2.CacheMode.values():
        out.append(FieldViolation("cache_mode", "unknown cache mode"))
    return out
