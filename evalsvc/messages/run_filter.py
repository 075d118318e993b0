"""ListRuns' `filter` and `order_by`: a documented subset of AIP-160 and AIP-132, parsed into terms the store
turns into SQL (evalsvc.store.runs.list_sizes_query).

The grammar (README "Listing runs"): terms `FIELD OP VALUE` joined by `AND`, where FIELD OP VALUE is one of

    create_time < <= > >= "RFC 3339 time"      end_time < <= > >= "RFC 3339 time"
    display_name = "exact"                     display_name : "substring" (case-insensitive)
    status = RUN_STATUS_...                    dataset_id = "ds_..."
    overall_passed = true|false                labels.KEY = "value"      labels.KEY:*  (has the label)

A value is a double-quoted string (backslash escapes the next character; \\n and \\t are a newline and a
tab) or, where no quotes are needed, a bare word. OR, NOT (`-`), parentheses and the other AIP-160
operators are refused by name, not misread: a filter this server took for something else would list the
wrong runs in silence. Any mistake is one violation on `filter` saying at which character and what was
expected there, so a person (or an agent) can fix it from the message alone.

Bounded (MAX_FILTER_CHARS, MAX_TERMS) so that a request cannot make the parser, or the SQL it builds,
arbitrarily large: each term is one predicate, and a label term one EXISTS.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, cast

from evalsvc.messages.convert import nanoseconds
from evalsvc.messages.validation import LABEL_KEY
from evalsvc.v1 import run_pb2

MAX_FILTER_CHARS = 2048
MAX_TERMS = 20

Comparator = Literal["<", "<=", ">", ">=", "=", ":"]
_Kind = Literal["string", "op", "word", "end"]
_ORDERED: tuple[Comparator, ...] = ("<", "<=", ">", ">=")
_TIME_FIELDS = ("create_time", "end_time")
_FIELDS = ("create_time", "end_time", "display_name", "status", "dataset_id", "overall_passed", "labels.KEY")
_EXAMPLE = "2026-01-02T15:04:05Z"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)
_RUN_STATUSES = {name: number for name, number in run_pb2.RunStatus.items() if number != run_pb2.RUN_STATUS_UNSPECIFIED}
# A token: a quoted string (closed or not), a comparator, a parenthesis, or a bare word (anything else up to
# whitespace, a quote, a comparator or a parenthesis).
_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*"?)|(?P<op><=|>=|!=|[<>=:~]|[()])|(?P<word>[^\s"<>=:!~()]+))')
_CLOSED = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPED = {"n": "\n", "t": "\t"}


class FilterError(ValueError):
    """A filter or order_by this server cannot take: the message says where and what was expected."""


@dataclass(frozen=True, slots=True)
class Term:
    """One `FIELD OP VALUE` of a filter, its value parsed: for the times `>=` or `<` a bound in seconds since the
    epoch (see `_bound`), a RunStatus number for status, a bool for overall_passed, a string otherwise; None
    for `labels.KEY:*`."""

    field: str  # create_time, end_time, display_name, status, dataset_id, overall_passed or labels
    op: Comparator
    value: float | int | bool | str | None
    key: str = ""  # the label's key, for field `labels`


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # as written (a string with its quotes)
    at: int  # 1-based character position

    def shown(self) -> str:
        return "the end of the filter" if self.kind == "end" else repr(self.text[:40])


def parse_filter(text: str) -> tuple[Term, ...]:
    """The terms of a ListRuns filter (all of which a run must match); FilterError says what is wrong."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"at most {MAX_FILTER_CHARS} characters (got {len(text)})")
    tokens = _tokens(text)
    if tokens[0].kind == "end":
        return ()
    terms: list[Term] = []
    position = 0
    while True:
        if len(terms) == MAX_TERMS:
            raise FilterError(f"at most {MAX_TERMS} terms joined by AND")
        term, position = _term(tokens, position)
        terms.append(term)
        joint = tokens[position]
        if joint.kind == "end":
            return tuple(terms)
        if joint.kind == "word" and joint.text in ("OR", "or"):
            raise FilterError(f"at character {joint.at}: OR is not supported; only terms joined by AND")
        if joint.kind != "word" or joint.text != "AND":
            raise FilterError(f"at character {joint.at}: expected AND or the end of the filter, found {joint.shown()}")
        position += 1


def parse_order_by(text: str) -> bool:
    """Whether ListRuns' `order_by` asks for the newest first (the default, "" or `create_time desc`) rather
    than the oldest (`create_time` or `create_time asc`); FilterError for anything else."""
    words = text.replace(",", " , ").split()
    if not words or words in (["create_time", "desc"], ["create_time", "DESC"]):
        return True
    if words in (["create_time"], ["create_time", "asc"], ["create_time", "ASC"]):
        return False
    raise FilterError('expected "create_time desc" (newest first, the default) or "create_time" (oldest first)')


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while True:
        found = _TOKEN.match(text, position)
        if found is None or found.lastgroup is None:
            rest = text[position:]
            if rest.strip():  # a `!` alone: read as the end, it dropped every term after it
                at = len(text) - len(rest.lstrip()) + 1
                raise FilterError(f"at character {at}: unexpected {rest.lstrip()[0]!r}")
            tokens.append(_Token("end", "", len(text) + 1))  # only whitespace is left (or nothing)
            return tokens
        kind, at = found.lastgroup, found.start(found.lastgroup) + 1
        if kind == "string" and not _CLOSED.fullmatch(found.group(kind)):
            raise FilterError(f"at character {at}: the string is not closed by a double quote")
        tokens.append(_Token(cast("_Kind", kind), found.group(kind), at))
        position = found.end()


def _term(tokens: list[_Token], position: int) -> tuple[Term, int]:
    """The term starting at tokens[position], and the position after it. The tokens end with an "end" token,
    which is refused wherever it stands before the term ends, so what follows a token is there to read."""
    name = tokens[position]
    if name.kind == "op" and name.text == "(":
        raise FilterError(f"at character {name.at}: parentheses are not supported; only terms joined by AND")
    if name.kind == "word" and (name.text in ("NOT", "not") or name.text.startswith("-")):
        raise FilterError(f"at character {name.at}: NOT is not supported; only terms joined by AND")
    field = name.text if name.kind == "word" else ""
    key = ""
    if field.startswith("labels."):
        field, key = "labels", field.removeprefix("labels.")
        if not LABEL_KEY.fullmatch(key):
            raise FilterError(f"at character {name.at + 7}: a label key must match [a-z][a-z0-9_-]{{0,62}}")
    elif field not in _FIELDS:
        raise FilterError(f"at character {name.at}: expected a field ({', '.join(_FIELDS)}), found {name.shown()}")
    op = tokens[position + 1]
    allowed: tuple[Comparator, ...] = {
        "create_time": _ORDERED,
        "end_time": _ORDERED,
        "display_name": ("=", ":"),
        "labels": ("=", ":"),
    }.get(field, ("=",))
    if op.kind != "op" or op.text not in allowed:
        raise FilterError(
            f"at character {op.at}: expected {' or '.join(allowed)} after {name.text}, found {op.shown()}"
        )
    value = _value(field, op.text, tokens[position + 2])
    if isinstance(value, int) and field in _TIME_FIELDS:
        comparator, seconds = _bound(op.text, value)
        return Term(field, comparator, seconds), position + 3
    return Term(field, op.text, value, key), position + 3


def _value(field: str, op: str, token: _Token) -> float | int | bool | str | None:
    """A term's value, parsed for its field; FilterError when it is not one the field takes."""
    where = f"at character {token.at}"
    if field in _TIME_FIELDS:
        return _nanoseconds(token)
    if field == "overall_passed":
        if token.kind != "word" or token.text not in ("true", "false"):
            raise FilterError(f"{where}: expected true or false, found {token.shown()}")
        return token.text == "true"
    if field == "labels" and op == ":":
        if token.kind != "word" or token.text != "*":
            raise FilterError(f'{where}: expected * (labels.KEY:* has the label; labels.KEY = "v" has it with v)')
        return None
    if token.kind not in ("string", "word"):
        raise FilterError(f"{where}: expected a value, found {token.shown()}")
    text = _unquoted(token) if token.kind == "string" else token.text
    if field == "status":
        if text not in _RUN_STATUSES:
            raise FilterError(f"{where}: expected a run status ({', '.join(_RUN_STATUSES)}), found {token.shown()}")
        return _RUN_STATUSES[text]
    return text


def _nanoseconds(token: _Token) -> int:
    """The time a time term's token holds, in nanoseconds since the epoch, exactly as written."""
    found = _RFC3339.fullmatch(_unquoted(token)) if token.kind == "string" else None
    if found is None:
        raise FilterError(f'at character {token.at}: expected an RFC 3339 time in double quotes, e.g. "{_EXAMPLE}"')
    text = found.group(0).upper()
    fraction = found.group(1) or ""
    try:
        whole = datetime.fromisoformat(text.replace(fraction, "", 1))
    except ValueError as exc:
        raise FilterError(f"at character {token.at}: {text!r} is no time ({exc})") from exc
    seconds = (whole - _EPOCH) // timedelta(seconds=1)
    return seconds * 1_000_000_000 + int(fraction[1:].ljust(9, "0") or 0)


def _bound(op: Comparator, nanos: int) -> tuple[Comparator, float]:
    """A time term as a comparison of the stored seconds (a float) that selects exactly the runs whose time,
    as the API shows it (convert.nanoseconds), compares so with `nanos`: `create_time > T`, T
    copied from a run, leaves that run out, and `create_time <= T` keeps it, whatever the float's last digits.
    Every comparator becomes `>=` or `<` of the least stored time shown at or after a time, which keeps it a
    range of the index."""
    if op in (">", "<="):
        nanos += 1
    return (">=" if op in (">", ">=") else "<"), _least_seconds_shown_at(nanos)


def _least_seconds_shown_at(nanos: int) -> float:
    """The least float of seconds that the API shows as `nanos` or later (shown time is monotonic in the
    seconds), found by halving the range of non-negative floats' bit patterns (which order as their values):
    at most 64 steps. Walked a float step at a time, a bound at or near 1970 took forever (the steps near 0
    are far below a nanosecond) and held the event loop, and so the server, for good. Every stored time is
    after 1970, so a bound at or before it is 0.0: `>=` it is every run, `<` it none."""
    if nanos <= 0:
        return 0.0
    low, high = 0, _bits(2 * nanos / 1e9 + 1.0)  # shown before `nanos`, and at or after it
    while high - low > 1:
        middle = (low + high) // 2
        if nanoseconds(_float(middle)) >= nanos:
            high = middle
        else:
            low = middle
    return _float(high)


def _bits(value: float) -> int:
    """A non-negative float's bit pattern, as an integer (ordered as the floats are)."""
    return int.from_bytes(struct.pack(">d", value), "big")


def _float(bits: int) -> float:
    """The float of a bit pattern (`_bits`)."""
    return cast("float", struct.unpack(">d", bits.to_bytes(8, "big"))[0])


def _unquoted(token: _Token) -> str:
    """A quoted string's text: its quotes off, each backslash escape replaced by what it stands for."""
    return _ESCAPE.sub(lambda m: _ESCAPED.get(m.group(1), m.group(1)), token.text[1:-1])
