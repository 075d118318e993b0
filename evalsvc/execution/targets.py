"""Targets: what produces an output for an item.

A target either returns a `Response` or raises `TargetError`; the executor records a target error
as an ERROR result for every grader of that evaluation.
"""

from __future__ import annotations

from typing import Protocol

from evalsvc.v1 import item_pb2, target_pb2


class TargetError(Exception):
    """The target could not produce an output for an item; `reason` is recorded on its results."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Target(Protocol):
    """Produces the output for one item."""

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The target's output for the item."""
        ...


class ProvidedTarget:
    """Outputs were recorded beforehand: each item carries its response."""

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The item's recorded response."""
        if not item.HasField("response"):
            raise TargetError(f"item {item.id!r} has no recorded response for the provided target")
        return item.response


class EchoTarget:
    """Answers with the input, for smoke tests of graders and plumbing."""

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The item's input as the output."""
        return item_pb2.Response(content=item.input)


def build_target(spec: target_pb2.Target) -> Target:
    """The target a (validated) spec describes."""
    kind = spec.WhichOneof("kind")
    if kind == "provided":
        return ProvidedTarget()
    if kind == "echo":
        return EchoTarget()
    raise ValueError(f"unknown target kind {kind!r}")
