"""Create-once semantics for every Create method (AIP-155 request_id).

The same request_id (per tenant) with the same request returns what the first call created, also
under concurrent retries; with a different request it is ALREADY_EXISTS. A unique constraint on
(tenant, request_id) settles races between processes: the loser re-reads the winner's row (also when
the winner took the last place under a per-tenant cap, so the loser was refused for it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, cast

import grpc
from google.protobuf.message import Message
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import Reason, ServiceError
from evalsvc.store.db import Database

T = TypeVar("T")


class Created(Protocol):
    """What a Create method stored, as its record reads: what it created, and the fingerprint of the
    request that created it."""

    @property
    def id(self) -> str: ...

    @property
    def request_hash(self) -> str: ...


R = TypeVar("R", bound=Created)


def fingerprint(message: Message) -> str:
    """A digest of a request's definition: equal definitions, equal digests (deterministic serialization)."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def conflict(kind: str, request_id: str, existing_id: str, used: str = "") -> ServiceError:
    """ALREADY_EXISTS for a request_id reused with a different request; the ErrorInfo metadata names
    what the first request created (`run_id`, `grader_id`, ...), as docs/errors.md promises. `used` says
    what the request_id was used for when "for a different {kind}" would not be true (an append to the
    same dataset with other items)."""
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        Reason.REQUEST_ID_CONFLICT,
        f"request_id {request_id!r} was already used {used or f'for a different {kind}'}",
        metadata={f"{kind}_id": existing_id},
    )


async def create_once(
    db: Database,
    *,
    kind: str,
    request_id: str,
    fingerprint: str,
    find: Callable[[AsyncConnection], Awaitable[R | None]],
    create: Callable[[AsyncConnection], Awaitable[T]],
    replay: Callable[[R], Awaitable[T]],
    used: Callable[[R], str] | None = None,
) -> T:
    """Run `create` in a write transaction unless `find` shows the request_id was used already;
    then `replay` answers with what the first request created, or, when the first request differed,
    `conflict` says so (`used`: what the first one was used for, as `conflict` takes it)."""

    async def first_or_create(conn: AsyncConnection) -> tuple[R | None, T | None]:
        existing = await find(conn) if request_id else None
        return (existing, None) if existing is not None else (None, await create(conn))

    try:
        existing, created = await db.transact(first_or_create)
        if existing is None:
            return cast("T", created)
    except (IntegrityError, ServiceError) as exc:
        # A concurrent call with the same request_id won: the unique key refused this one's row, or
        # (PostgreSQL replicas) this one looked before the winner committed and then, counting under a
        # cap's lock after it, found no room. Either way it is a retry of the winner's request.
        refused_by_cap = isinstance(exc, ServiceError) and exc.reason == Reason.TENANT_QUOTA_EXCEEDED
        if not request_id or not (isinstance(exc, IntegrityError) or refused_by_cap):
            raise
        async with db.read() as conn:
            existing = await find(conn)
        if existing is None:
            raise
    if existing.request_hash != fingerprint:
        raise conflict(kind, request_id, existing.id, used(existing) if used else "")
    return await replay(existing)
