"""Identifiers, tenant names and page tokens.

Run and dataset ids sort by creation time (microseconds, then randomness), so "newest first"
is an index scan on the primary key and keyset pagination needs nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from evalsvc.errors import FieldViolation, invalid_argument, invalid_page_token

M = TypeVar("M", bound=Message)
P = TypeVar("P")


@dataclass(frozen=True)
class Chosen(Generic[P]):
    """The rows a list page chose by their stored sizes (`PageTokens.choose`), before reading them: their
    positions, in order, and whether rows were left after them (past the page's bytes or its limit)."""

    positions: list[P]
    more: bool


_last_micros = 0

# Identifies this server process, e.g. so it can ignore its own database notifications.
PROCESS_ID = os.urandom(6).hex()
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def is_tenant_name(name: str) -> bool:
    """Whether `name` can be a tenant: 1-64 characters of [a-z0-9_-], starting with a letter or digit."""
    return bool(_TENANT.fullmatch(name))


def new_id(prefix: str) -> str:
    """A time-sortable id such as `run_0005f4b1c2d3e4a1b2c3d4e5`: microseconds, then randomness.

    Within a process the time part strictly increases, so ids created one after another sort in
    creation order even within the same microsecond."""
    global _last_micros
    _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
    return f"{prefix}_{_last_micros:014x}{os.urandom(5).hex()}"


class PageTokens:
    """Issues and checks page tokens: opaque, and authenticated with the server's key.

    A token is the keyset position (JSON) and an HMAC-SHA256 (128 bits) over the position, the
    tenant, the list it came from and the request's filters, base64url-encoded. So a token is
    accepted only by the tenant it was issued to, on the same list with the same filters, and a
    forged or altered one never reaches a query: every such token is INVALID_PAGE_TOKEN. The key is
    the database's (`store.server_keys`), so tokens outlive restarts and work on every replica."""

    MAX_TOKEN_CHARS = 1024
    _MAC_BYTES = 16

    # What a response holds besides its one listed message when that message is as large as it may be
    # (`item_bytes`): the next page token (at most MAX_TOKEN_CHARS) and the fields' framing.
    RESPONSE_RESERVE = 16 << 10

    def __init__(self, key: bytes = b"", page_bytes: int = 8 << 20) -> None:
        self.key = key
        # The most a page of large messages (items, results with their outputs) may hold: half the
        # largest message a call may send (`--max-message-bytes`), so a page never fails the call.
        self.page_bytes = page_bytes

    @property
    def item_bytes(self) -> int:
        """The most one listed message may be: a page holds at least one, however large, so that one
        must fit in a response on its own (`--max-message-bytes`, twice `page_bytes`, less what the
        rest of the response takes). Listed results cut their outputs to it (evalsvc.runs.outputs):
        a result with a 16 MB output, or a comparison item with two 9 MB ones, was a response over
        --max-message-bytes, INTERNAL for every page that held it."""
        return 2 * self.page_bytes - self.RESPONSE_RESERVE

    def fitting(self, messages: Sequence[Message]) -> int:
        """How many of a page's leading messages fit in `page_bytes` together (at least one): a page
        of 100 dataset items of 1.4 MB failed whole with RESOURCE_EXHAUSTED ("larger than max"),
        which REST answered as 429, a retry that could never succeed. The rest is the next page's."""
        return self.fitting_sizes(message.ByteSize() for message in messages)

    def fitting_sizes(self, sizes: Iterable[int]) -> int:
        """How many of a page's leading rows of these serialized sizes fit in `page_bytes` together (at
        least one, when there is one), as `fitting`, before the rows are read whole: lists read their
        rows' sizes first and then only the rows that fit. A page that read its rows whole and dropped
        what did not fit read 1,000 dataset items of 4 MiB (~4 GB) to answer with one of them."""
        total = kept = 0
        for size in sizes:
            total += size
            if total > self.page_bytes and kept > 0:
                break
            kept += 1
        return kept

    def page(
        self,
        tenant: str,
        kind: str,
        query: dict[str, Any],
        messages: Sequence[M],
        read: int,
        position: Callable[[int], Any],
    ) -> tuple[list[M], str]:
        """A page of list `kind`: the leading `messages` that fit (`fitting`), and the token of the page
        after the last of them (`position(i)` is the i-th message's), given when more rows were `read`
        (the page's limit plus one when there are more) than the page keeps."""
        kept = list(messages[: self.fitting(messages)])
        return kept, self.encode(tenant, kind, query, position(len(kept) - 1)) if read > len(kept) else ""

    def choose(self, sized: Sequence[tuple[P, int]], limit: int) -> Chosen[P]:
        """The rows a page of `limit` takes from a size read of up to `limit` + 1 (position, size) rows: the
        leading ones that fit (`fitting_sizes`: at least one of a page that has rows)."""
        fitting = self.fitting_sizes(size for _, size in sized[:limit])
        return Chosen([position for position, _ in sized[:fitting]], len(sized) > fitting)

    def chosen_page(
        self,
        tenant: str,
        kind: str,
        query: dict[str, Any],
        messages: Sequence[M],
        position: Callable[[int], Any],
        chosen: Chosen[Any],
    ) -> tuple[list[M], str]:
        """A page of list `kind` whose rows were chosen by their sizes (`choose`), then read by id: the
        leading `messages` that fit, and the token of the page after them. When rows were left after the
        chosen ones the token goes after the last chosen row, even when it, or every chosen row, was
        deleted between the reads; the rows created meanwhile are newer than the page and not on it."""
        kept = list(messages[: self.fitting(messages)])
        if len(kept) < len(messages):
            return kept, self.encode(tenant, kind, query, position(len(kept) - 1))
        return kept, self.encode(tenant, kind, query, chosen.positions[-1]) if chosen.more else ""

    def encode(self, tenant: str, kind: str, query: dict[str, Any], position: Any) -> str:
        """The token of the page after `position` in list `kind` with filters `query`."""
        raw = json.dumps(position, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._mac(tenant, kind, query, raw) + raw).decode().rstrip("=")

    def decode(self, tenant: str, kind: str, query: dict[str, Any], token: str) -> Any:
        """The position `token` holds (None for no token); INVALID_PAGE_TOKEN unless this service
        issued it to this tenant for this list and these filters."""
        if not token:
            return None
        try:
            if len(token) > self.MAX_TOKEN_CHARS:
                raise ValueError("too long")
            data = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
            mac, raw = data[: self._MAC_BYTES], data[self._MAC_BYTES :]
            if not hmac.compare_digest(mac, self._mac(tenant, kind, query, raw)):
                raise ValueError("not signed for this request")
            return json.loads(raw)
        except ValueError as exc:  # bad base64, non-ASCII, a MAC that does not match
            raise invalid_page_token() from exc

    def _mac(self, tenant: str, kind: str, query: dict[str, Any], raw: bytes) -> bytes:
        if not self.key:
            raise RuntimeError("page tokens are used before the server loaded its key")
        bound = json.dumps([tenant, kind, query], sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self.key, bound + b"\0" + raw, hashlib.sha256).digest()[: self._MAC_BYTES]


def page_size(requested: int, default: int, field: str = "page_size", maximum: int = 1000) -> int:
    """The page size to use: default for 0, at most `maximum` (a larger one is coerced to it, as AIP-158
    asks: `page_size=100000` was a 400), INVALID_ARGUMENT when negative."""
    if requested < 0:
        raise invalid_argument([FieldViolation(field, f"must be at least 0 (0 means {default}; at most {maximum})")])
    return min(requested, maximum) or default
