"""Identifiers and page tokens.

Run and dataset ids sort by creation time (microseconds, then randomness), so "newest first"
is an index scan on the primary key and keyset pagination needs nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

from evalsvc.errors import FieldViolation, invalid_argument

_last_micros = 0

# Identifies this server process, e.g. so it can ignore its own database notifications.
PROCESS_ID = os.urandom(6).hex()


def new_id(prefix: str) -> str:
    """A time-sortable id such as `run_0005f4b1c2d3e4a1b2c3d4e5`: microseconds, then randomness.

    Within a process the time part strictly increases, so ids created one after another sort in
    creation order even within the same microsecond."""
    global _last_micros
    _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
    return f"{prefix}_{_last_micros:014x}{os.urandom(5).hex()}"


def encode_page_token(position: Any, query: dict[str, Any]) -> str:
    """An opaque token holding the keyset position and a fingerprint of the query it belongs to."""
    raw = json.dumps({"p": position, "q": query}, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: dict[str, Any], field: str = "page_token") -> Any:
    """The keyset position of `token`; INVALID_ARGUMENT when it is garbled or from another query."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position, token_query = data["p"], data["q"]
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid_argument([FieldViolation(field, "page_token is not one this service issued")]) from exc
    if token_query != json.loads(json.dumps(query, sort_keys=True)):
        raise invalid_argument([FieldViolation(field, "page_token belongs to a request with other filters")])
    return position


def page_size(requested: int, default: int, field: str = "page_size", maximum: int = 1000) -> int:
    """The page size to use: default for 0, INVALID_ARGUMENT outside 0..maximum."""
    if requested < 0 or requested > maximum:
        raise invalid_argument([FieldViolation(field, f"must be between 0 and {maximum}")])
    return requested or default
