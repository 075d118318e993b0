"""A large request is parsed on the event loop only after a worker process has found no huge map in it.

protobuf parses a map of many distinct keys superlinearly, holding the GIL throughout (a thread does
not help: the loop stalled for the whole parse). grpc.aio parses each request on the event loop, so
one tenant's request of one big map stalled every tenant's calls for seconds (one `Item.metadata` of
400,000 entries, ~5 MB: ~2 s; a CreateDataset of 1,000,000 labels, 12.9 MB: ~2.5 s), before any
validation could refuse it. Bounded maps parse linearly and fast (16 MB of maps of 65,536 entries:
~0.3 s, as fast as any 16 MB of items).

So on a gRPC server a request over CHECKED_BYTES is first parsed by one worker process
(`python -m evalsvc.api.decode_worker`, over evalsvc.workers' pipes), which looks for its largest
map anywhere in the message's tree (within repeated messages and map values; each nested
google.protobuf.Struct is a map of its own). A map of more than MAX_MAP_ENTRIES ends the call
INVALID_ARGUMENT naming its field; bytes that do not decode are MALFORMED_REQUEST, as on the loop;
otherwise the loop parses the request as it would have. Requests under CHECKED_BYTES are parsed on
the loop at once: one of at most 1 MiB holds a map of at most ~150,000 entries (7 bytes each: 3-byte
keys), parsed in under 0.1 s (measured: 66-97 ms), a pause the size of a GC pass, where the round
trip to the worker would cost every ordinary call more than it could save.

Why the numbers:
- MAX_MAP_ENTRIES (65,536) is far above every per-field bound the service documents (64 labels, 256
  entries of an item's metadata), so ordinary oversize input still gets the field's precise error
  from validation, and a map of that size parses in ~20-35 ms: what a request can make the loop do is
  linear in its bytes again.
- CHECK_TIMEOUT_S (5 s): a legitimate request's check is its parse (~0.5 s for 16 MB) and a walk of
  the messages that may hold maps (~0.4 s for 100,000 items, --max-items-per-dataset); a request
  that keeps the worker longer is the caller's doing (a hostile one of millions of entries), so
  its worker is killed and the call ends INVALID_ARGUMENT (REQUEST_TOO_COSTLY).

The one worker is started on first need and kept while it behaves; requests wait for it in turn,
round-robin across tenants (evalsvc.slots.Slots), so one tenant's stream of large requests delays
another's by at most one check, and a tenant has at most MAX_CHECKS_PER_TENANT of them checked or
waiting (RESOURCE_EXHAUSTED, `quota=large_requests_in_flight`, past it): each waits in a place of
--max-concurrent-rpcs. A worker that cannot start or dies ends the call UNAVAILABLE
(CHECKER_UNAVAILABLE, with RetryInfo). Calls waiting for it while the server stops end with it.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from evalsvc.errors import FieldViolation, Reason, ServiceError, invalid_argument
from evalsvc.limits import quota_exceeded
from evalsvc.slots import Slots
from evalsvc.workers import LoneWorker, WorkerGone

log = logging.getLogger(__name__)

CHECKED_BYTES = 1 << 20
MAX_MAP_ENTRIES = 65_536
CHECK_TIMEOUT_S = 5.0
# A tenant's requests being checked or waiting for the checker, at most: each holds a place of
# --max-concurrent-rpcs while it waits (its request arrived), and they are checked one at a time.
MAX_CHECKS_PER_TENANT = 4
CHECKS_RETRY_AFTER_S = 1.0
WORKER_MODULE = "evalsvc.api.decode_worker"


class Unparsed:
    """What a gRPC server's request deserializer yields for a request over CHECKED_BYTES: its bytes,
    their message class, and the loop's parse to run once the worker has checked them."""

    __slots__ = ("data", "message_class", "parse")

    def __init__(self, data: bytes, message_class: type[Message], parse: Callable[[bytes], Any]) -> None:
        self.data = data
        self.message_class = message_class
        self.parse = parse


def deferring(deserializer: Callable[[bytes], Any] | None, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse`, but yielding `Unparsed` for a request over CHECKED_BYTES when `deserializer` is a
    protobuf message's `FromString` (grpc's generated handlers; any other is its own business)."""
    message_class = getattr(deserializer, "__self__", None)
    if not (isinstance(message_class, type) and issubclass(message_class, Message)):
        return parse
    checked: type[Message] = message_class

    def deserialize(data: bytes) -> Any:
        return Unparsed(data, checked, parse) if len(data) > CHECKED_BYTES else parse(data)

    return deserialize


def map_too_large(path: str, entries: int) -> ServiceError:
    """INVALID_ARGUMENT naming the map of more than MAX_MAP_ENTRIES entries."""
    return invalid_argument(
        [FieldViolation(path, f"a map of {entries} entries: at most {MAX_MAP_ENTRIES} in one request")]
    )


def request_too_costly() -> ServiceError:
    """INVALID_ARGUMENT (REQUEST_TOO_COSTLY): checking the request took longer than CHECK_TIMEOUT_S."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.REQUEST_TOO_COSTLY,
        f"the request took longer than {CHECK_TIMEOUT_S:g} s to decode and was refused; send fewer map "
        f"entries (at most {MAX_MAP_ENTRIES} in one map) or split it",
    )


def checker_unavailable() -> ServiceError:
    """UNAVAILABLE (CHECKER_UNAVAILABLE): the process that checks large requests cannot be used now."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.CHECKER_UNAVAILABLE,
        f"the server cannot check requests over {CHECKED_BYTES} bytes now; retry shortly",
        retry_after_s=1.0,
    )


class RequestChecker:
    """The worker process that checks large requests (started on first need, kept while it behaves),
    used by one request at a time, in turn across tenants."""

    def __init__(self) -> None:
        self._slots = Slots(1)
        self._worker = LoneWorker(WORKER_MODULE, "checks large requests")
        self._checks: Counter[str] = Counter()  # each tenant's requests being checked or waiting

    async def problem(self, tenant: str, request: Unparsed) -> str | None:
        """Why the request's bytes are not its message (None: they are, and hold no map over
        MAX_MAP_ENTRIES); ServiceError when the request is refused or cannot be checked now."""
        payload = pickle.dumps(
            (
                request.message_class.__module__,
                request.message_class.DESCRIPTOR.full_name,
                request.data,
                MAX_MAP_ENTRIES,
            )
        )
        if self._checks[tenant] >= MAX_CHECKS_PER_TENANT:
            raise quota_exceeded(
                "large_requests_in_flight",
                f"the tenant already has {MAX_CHECKS_PER_TENANT} requests over {CHECKED_BYTES} bytes being "
                "checked; they are checked one at a time",
                retry_after_s=CHECKS_RETRY_AFTER_S,
            )
        self._checks[tenant] += 1
        try:
            await self._slots.acquire(tenant)
            try:
                problem, path, entries = await self._exchange(payload)
            finally:
                self._slots.release()
        finally:
            self._checks[tenant] -= 1
            if not self._checks[tenant]:
                del self._checks[tenant]
        if entries > MAX_MAP_ENTRIES:
            raise map_too_large(path, entries)
        return problem

    async def _exchange(self, payload: bytes) -> tuple[str | None, str, int]:
        """The worker's reply (evalsvc.workers.LoneWorker.call)."""
        try:
            reply: tuple[str | None, str, int] = await self._worker.call(payload, CHECK_TIMEOUT_S)
        except TimeoutError:
            log.info("a request took longer than %g s to check; its checking process was stopped", CHECK_TIMEOUT_S)
            raise request_too_costly() from None
        except WorkerGone:
            raise checker_unavailable() from None
        return reply

    async def close(self) -> None:
        """Stop the worker, busy or not (a check in progress ends UNAVAILABLE), and start no other."""
        await self._worker.close()
