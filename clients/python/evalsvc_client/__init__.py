"""Typed Python client for evalsvc: `EvalClient` (blocking) and `AsyncEvalClient` (asyncio), plus `evalctl`.

from evalsvc_client import EvalClient, builders

with EvalClient("127.0.0.1:50051", api_key="evk_...") as client:
    run = client.create_run(
        items=[builders.item("2+2?", "4", response="4")],
        target=builders.provided(),
        graders=[builders.exact_match()],
    )
    for event in client.watch(run.id):
        print(event.seq, event.counts.completed_evaluations, "/", event.counts.total_evaluations)
"""

from evalsvc_client import builders, pb
from evalsvc_client._common import ClientOptions, Retrying, RetryPolicy, TLSOptions, WatchPolicy, is_terminal
from evalsvc_client.aio import AsyncEvalClient
from evalsvc_client.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    EvalError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from evalsvc_client.sync import EvalClient

__version__ = "0.2.0"

__all__ = [
    "AlreadyExistsError",
    "AsyncEvalClient",
    "ClientOptions",
    "DeadlineExceededError",
    "EvalClient",
    "EvalError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Retrying",
    "TLSOptions",
    "UnauthenticatedError",
    "UnavailableError",
    "WatchPolicy",
    "builders",
    "is_terminal",
    "pb",
]
