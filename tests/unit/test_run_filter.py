"""ListRuns' filter and order_by grammar (evalsvc.messages.run_filter): what it takes, what it refuses and where
it says the mistake is, and its bounds."""

from __future__ import annotations

import random

import pytest

from evalsvc.messages.convert import timestamp
from evalsvc.messages.run_filter import MAX_FILTER_CHARS, MAX_TERMS, FilterError, Term, parse_filter, parse_order_by
from evalsvc.v1 import run_pb2


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("", ()),
        ("   ", ()),
        ("status = RUN_STATUS_FAILED", (Term("status", "=", run_pb2.RUN_STATUS_FAILED),)),
        ('status="RUN_STATUS_RUNNING"', (Term("status", "=", run_pb2.RUN_STATUS_RUNNING),)),
        ("display_name:nightly-", (Term("display_name", ":", "nightly-"),)),
        (r'display_name = "a \"b\" c\\ d\n"', (Term("display_name", "=", 'a "b" c\\ d\n'),)),
        ('display_name = ""', (Term("display_name", "=", ""),)),
        ("display_name : 50%_", (Term("display_name", ":", "50%_"),)),  # the store escapes LIKE's wildcards
        ("labels.team = search", (Term("labels", "=", "search", "team"),)),
        ('labels.my-key = "a b"', (Term("labels", "=", "a b", "my-key"),)),
        ("labels.team:*", (Term("labels", ":", None, "team"),)),
        ("dataset_id = ds_1", (Term("dataset_id", "=", "ds_1"),)),
        (
            "overall_passed = true AND overall_passed=false",
            (Term("overall_passed", "=", True), Term("overall_passed", "=", False)),
        ),
        ('create_time >= "1970-01-01T00:00:01Z"', (Term("create_time", ">=", 1.0),)),
        ('end_time < "1970-01-01T02:00:00.5+02:00"', (Term("end_time", "<", 0.5),)),
        ('end_time < "1970-01-01t00:00:02z"', (Term("end_time", "<", 2.0),)),
    ],
)
def test_a_filter_is_parsed_into_its_terms(text: str, terms: tuple[Term, ...]) -> None:
    assert parse_filter(text) == terms


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("display_name = a OR status = RUN_STATUS_FAILED", "at character 18: OR is not supported"),
        ("display_name = a or status = RUN_STATUS_FAILED", "at character 18: OR is not supported"),
        ("NOT display_name = a", "at character 1: NOT is not supported"),
        ("-display_name = a", "at character 1: NOT is not supported"),
        ("(display_name = a)", "at character 1: parentheses are not supported"),
        (
            "display_name = a and status = RUN_STATUS_FAILED",
            "at character 18: expected AND or the end of the filter, found 'and'",
        ),
        ("display_name = a status = RUN_STATUS_FAILED", "at character 18: expected AND"),
        ("display_name = a AND", "at character 21: expected a field (create_time, end_time, display_name, status"),
        ("description = a", "at character 1: expected a field"),
        ('"display_name" = a', "at character 1: expected a field"),
        ("display_name", "at character 13: expected = or : after display_name, found the end of the filter"),
        ("display_name != a", "at character 14: expected = or : after display_name, found '!='"),
        ("display_name ~ a", "at character 14: expected = or :"),
        ("display_name < a", "at character 14: expected = or :"),
        ("display_name =", "at character 15: expected a value, found the end of the filter"),
        ("display_name = =", "at character 16: expected a value, found '='"),
        ('display_name = "open', "at character 16: the string is not closed by a double quote"),
        ('display_name = "ends in a backslash\\"', "the string is not closed"),
        ("status = FAILED", "at character 10: expected a run status (RUN_STATUS_PENDING, RUN_STATUS_RUNNING"),
        ("status = RUN_STATUS_UNSPECIFIED", "expected a run status"),
        ("status : RUN_STATUS_FAILED", "at character 8: expected = after status"),
        ("overall_passed = True", "at character 18: expected true or false, found 'True'"),
        ('overall_passed = "true"', "expected true or false"),
        ("labels.Team = a", "at character 8: a label key must match"),
        ("labels. = a", "a label key must match"),
        ("labels.team:x", "at character 13: expected * (labels.KEY:* has the label"),
        ("labels.team < x", "expected = or : after labels.team"),
        ('create_time = "2026-01-01T00:00:00Z"', "at character 13: expected < or <= or > or >= after create_time"),
        (
            "create_time > 2026-01-01T00:00:00Z",
            'at character 15: expected an RFC 3339 time in double quotes, e.g. "2026-01-02T15:04:05Z"',
        ),
        ('create_time > "2026-01-01"', "expected an RFC 3339 time"),
        ('create_time > "2026-01-01T00:00:00"', "expected an RFC 3339 time"),  # no offset: which zone?
        ('create_time > "yesterday"', "expected an RFC 3339 time"),
        ('display_name:"cole" ! AND status = RUN_STATUS_PENDING', "at character 21: unexpected '!'"),  # was the end
        ("display_name = Hello!", "at character 21: unexpected '!'"),  # read as `display_name = Hello`
        ('create_time > "2026-01-02T00:00:00.\u0665Z"', "expected an RFC 3339 time"),  # an Arabic-Indic digit
        (
            'end_time > "2026-13-01T00:00:00Z"',
            "at character 12: '2026-13-01T00:00:00Z' is no time (month must be in 1..12)",
        ),
    ],
)
def test_a_filter_it_cannot_take_says_where_and_what_was_expected(text: str, says: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert says in str(caught.value)


def test_a_filter_is_bounded_in_characters_and_terms() -> None:
    longest = 'display_name = "' + "x" * (MAX_FILTER_CHARS - 17) + '"'
    assert parse_filter(longest) == (Term("display_name", "=", "x" * (MAX_FILTER_CHARS - 17)),)
    with pytest.raises(FilterError, match=f"at most {MAX_FILTER_CHARS} characters \\(got {MAX_FILTER_CHARS + 1}\\)"):
        parse_filter(longest[:-1] + 'x"')
    most = " AND ".join(f"labels.k{i}:*" for i in range(MAX_TERMS))
    assert len(parse_filter(most)) == MAX_TERMS
    with pytest.raises(FilterError, match=f"at most {MAX_TERMS} terms"):
        parse_filter(most + " AND labels.one_more:*")


def test_a_time_compares_as_the_api_shows_it_to_the_nanosecond() -> None:
    """A run's create_time copied from the API (nanoseconds of a float of seconds) into a filter: `>` leaves
    that run out and `<=` keeps it, whatever the float's last digits (taken to the microsecond, `>` kept it)."""
    rng = random.Random(7)
    for _ in range(2000):
        stored = 1.7e9 + rng.random() * 1e8
        shown = timestamp(stored).ToJsonString()  # type: ignore[union-attr]

        def matches(op: str, stored: float = stored, shown: str = shown) -> bool:
            (term,) = parse_filter(f'create_time {op} "{shown}"')
            assert term.op in (">=", "<") and isinstance(term.value, float)
            return stored >= term.value if term.op == ">=" else stored < term.value

        assert (matches(">="), matches("<="), matches(">"), matches("<")) == (True, True, False, False), shown


@pytest.mark.parametrize(
    "when", ["9999-12-31T23:59:59.999999999Z", "0001-01-01T00:00:00+14:00", "1969-12-31T23:59:59.5Z"]
)
def test_a_time_at_the_ends_of_rfc_3339_is_a_bound_not_an_error(when: str) -> None:
    """Past the range a Timestamp holds (year 9999 and a nanosecond) the bound was INTERNAL (protobuf's ValueError)."""
    for op in ("<", "<=", ">", ">="):
        (term,) = parse_filter(f'end_time {op} "{when}"')
        assert term.op in (">=", "<") and isinstance(term.value, float)


@pytest.mark.parametrize(
    "when",
    [
        "1970-01-01T00:00:00Z",
        "1969-12-31T23:59:59.999999999Z",
        "1970-01-01T05:30:00+05:30",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:00:00.000000001Z",
    ],
)
def test_a_time_at_or_before_1970_is_a_bound_every_stored_time_is_past(when: str) -> None:
    """`create_time < "1970-01-01T00:00:00Z"` walked float steps below a nanosecond toward 0 for good, on the event
    loop: one request held the server at 100% CPU, deaf to SIGTERM. Every stored time is after 1970: a bound at or
    before it keeps every run by `>`/`>=` and none by `<`/`<=` (as does 1 ns after it: no stored time is so early)."""
    for op, kept in ((">=", True), (">", True), ("<", False), ("<=", False)):
        (term,) = parse_filter(f'create_time {op} "{when}"')
        assert isinstance(term.value, float)
        for stored in (0.25, 1.7e9):  # a quarter second after 1970, and 2023
            assert (stored >= term.value if term.op == ">=" else stored < term.value) is kept, (op, stored)


@pytest.mark.parametrize(
    ("text", "newest_first"),
    [
        ("", True),
        ("create_time desc", True),
        ("  create_time   DESC ", True),
        ("create_time", False),
        ("create_time asc", False),
    ],
)
def test_order_by_takes_create_time_either_way(text: str, newest_first: bool) -> None:
    assert parse_order_by(text) is newest_first


@pytest.mark.parametrize(
    "text", ["create_time up", "display_name", "create_time desc, id", "id", "desc", "create_time,"]
)
def test_any_other_order_by_is_refused(text: str) -> None:
    with pytest.raises(FilterError, match='expected "create_time desc"'):
        parse_order_by(text)
