"""Canonical forms: a message as JSON-able data, and the hash of such data.

What the response cache keys hash (evalsvc/execution/cache.py, a judge's verdict key in
evalsvc/graders/judge.py): the same definition always gives the same key, whatever its field order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message


def digest(material: Mapping[str, Any]) -> str:
    """The key of a JSON-able description: canonical JSON, hashed."""
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def definition(message: Message) -> dict[str, Any]:
    """A message as canonical JSON-able data (field names as in the proto, defaults left out)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# The violation of a Struct that `struct_values` refuses (target parameters, a tool's parameters, expected
# and recorded tool-call arguments): one description wherever a caller sends one.
NOT_JSON_VALUES = "must hold JSON values (no NaN or Infinity)"


def struct_values(struct: struct_pb2.Struct) -> dict[str, Any] | None:
    """A Struct as plain JSON values, or None when it holds NaN or Infinity, which JSON cannot carry
    (an endpoint's request body would fail to encode) and no value can equal."""
    try:
        return json_format.MessageToDict(struct)
    except ValueError:
        return None
