"""Webhook event types: their names, the run status each reports, and the bit each has in a
webhook's stored event mask (so finding the webhooks of an event is one indexed query)."""

from __future__ import annotations

from collections.abc import Iterable

from evalsvc.statuses import TERMINAL
from evalsvc.v1 import run_pb2

# In the order of a run's life; a type's bit is 1 << its index here, so never reorder or remove one.
EVENT_TYPES = ("run.created", "run.started", "run.succeeded", "run.failed", "run.cancelled")

_TYPE_OF_STATUS: dict[int, str] = {
    run_pb2.RUN_STATUS_PENDING: "run.created",
    run_pb2.RUN_STATUS_RUNNING: "run.started",
    run_pb2.RUN_STATUS_SUCCEEDED: "run.succeeded",
    run_pb2.RUN_STATUS_FAILED: "run.failed",
    run_pb2.RUN_STATUS_CANCELLED: "run.cancelled",
}
# What a webhook created without event types subscribes to: the events of a run's end.
TERMINAL_EVENT_TYPES = tuple(_TYPE_OF_STATUS[status] for status in TERMINAL)


def bit(event_type: str) -> int:
    """The event type's bit in an event mask."""
    return 1 << EVENT_TYPES.index(event_type)


def mask_of(event_types: Iterable[str]) -> int:
    """The event mask of known event types."""
    mask = 0
    for event_type in event_types:
        mask |= bit(event_type)
    return mask


def types_of(mask: int) -> list[str]:
    """The event types in a mask, in the order of a run's life."""
    return [event_type for event_type in EVENT_TYPES if mask & bit(event_type)]


def type_of_status(status: int) -> str | None:
    """The event type that reports a run entering `status` (every run status change is one)."""
    return _TYPE_OF_STATUS.get(status)
