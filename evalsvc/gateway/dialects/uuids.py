"""evalsvc ids shown as UUIDs, for vendors that document `string<uuid>` identifiers.

evalsvc's own ids (`run_0005f4b1c2d3e4a1b2c3d4e5`: a kind, 14 hex digits of microseconds and 10 of
randomness) are 96 bits plus a kind, so each fits in an RFC 9562 version-8 ("custom") UUID and can be
read back from it. A dialect maps ids at its edge with `to_uuid` and `from_uuid`; nothing is stored and
the rest of the service keeps one id scheme. Every replica maps the same way, ids keep their creation
order, and an old evalsvc-form id given to a dialect still works (`from_uuid` passes it through).

Things that have no evalsvc id of their own (an Omni result row, its agentic job and conversation) get
`derived_uuid`: a version-5 UUID of the names they are made of, stable across reads and replicas.

Layout of the 32 hex digits: `PPPPPPPPPPPP 8 PPP v PPPPPPPPPPPPPPP`, where `8` is the version, `v` the
RFC 4122 variant nibble (`8`) and the 30 `P` digits are the kind (one digit), the id's 24 hex digits and
five zeros, which `from_uuid` checks so that a random UUID is not mistaken for one of ours.
"""

from __future__ import annotations

import uuid

_KINDS = {"run": 1, "ds": 2, "tgt": 3, "grd": 4}
_PREFIXES = {code: prefix for prefix, code in _KINDS.items()}
_ID_DIGITS = 24
_PAD = "00000"
_NAMESPACE = uuid.UUID("6c1d3f0e-4a47-5d6b-9a43-2f0c8e5b7a10")  # evalsvc's namespace for derived UUIDs


def to_uuid(evalsvc_id: str) -> str:
    """The UUID form of an evalsvc id; an id of another shape is returned unchanged."""
    prefix, _, digits = evalsvc_id.partition("_")
    code = _KINDS.get(prefix)
    if code is None or len(digits) != _ID_DIGITS or not _is_hex(digits):
        return evalsvc_id
    payload = f"{code:x}{digits}{_PAD}"
    return str(uuid.UUID(f"{payload[:12]}8{payload[12:15]}8{payload[15:]}"))


def from_uuid(value: str) -> str:
    """The evalsvc id a UUID stands for; anything else (an evalsvc id, a foreign UUID) unchanged, so it
    reaches the service as given and is "not found" there if it names nothing."""
    try:
        digits = uuid.UUID(value).hex
    except ValueError:
        return value
    if digits[12] != "8" or digits[16] != "8":
        return value
    payload = digits[:12] + digits[13:16] + digits[17:]
    prefix = _PREFIXES.get(int(payload[0], 16))
    if prefix is None or not payload.endswith(_PAD):
        return value
    return f"{prefix}_{payload[1 : 1 + _ID_DIGITS]}"


def derived_uuid(*names: str) -> str:
    """A stable UUID for something named by `names` (e.g. a run id and an item id) that has no id."""
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(names)))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
