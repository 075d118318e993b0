"""Standard Webhooks signatures and delivery bodies (https://www.standardwebhooks.com).

A delivery is a POST whose body is `{"type", "timestamp", "data": {"run", "lastSeq"}}` in proto3 JSON
names, with the headers `webhook-id` (the delivery's id, the same on every retry), `webhook-timestamp`
(UNIX seconds of this attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
per secret, space-separated (two while a rotated secret is still honoured).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterable

from google.protobuf import json_format

from evalsvc.v1 import eval_run_service_pb2 as pb

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> bytes:
    """A fresh random signing key."""
    return os.urandom(SECRET_BYTES)


def secret_text(key: bytes) -> str:
    """The key as the caller sees it once: `whsec_` + base64, the form Standard Webhooks libraries take."""
    return SECRET_PREFIX + base64.b64encode(key).decode()


def body(event_type: str, event: pb.WatchRunResponse) -> bytes:
    """The JSON body reporting a run event: the run as of that event (aggregate included) and its seq,
    so a receiver can go on with WatchRun(after_seq=lastSeq) or ListRunResults."""
    document = {
        "type": event_type,
        "timestamp": event.event_time.ToJsonString(),
        "data": {"run": json_format.MessageToDict(event.run), "lastSeq": str(event.seq)},
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def signature(keys: Iterable[bytes], message_id: str, timestamp: int, payload: bytes) -> str:
    """The `webhook-signature` header value: one `v1,<base64>` per key."""
    signed = f"{message_id}.{timestamp}.".encode() + payload
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)


def headers(keys: Iterable[bytes], message_id: str, timestamp: int, payload: bytes) -> dict[str, str]:
    """Every header of one attempt."""
    return {
        "content-type": "application/json",
        "user-agent": "evalsvc-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(keys, message_id, timestamp, payload),
    }
