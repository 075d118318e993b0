"""Unit tests of the built-in graders: pure functions, so every case is a row in a table."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from evalsvc.errors import FieldViolation
from evalsvc.graders import Grade, compile_grader, grader_name, target_error_grade
from evalsvc.graders.validation import validate_grader
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

PASSED = run_pb2.RESULT_STATE_PASSED
FAILED = run_pb2.RESULT_STATE_FAILED
ERROR = run_pb2.RESULT_STATE_ERROR


def item(expected: str = "", tools: list[str] | None = None) -> item_pb2.Item:
    """An item with the fields graders read."""
    return item_pb2.Item(id="i1", input="question", expected_output=expected, expected_tool_calls=tools or [])


def call(name: str, **arguments: Any) -> item_pb2.ToolCall:
    """A tool call with JSON arguments."""
    tc = item_pb2.ToolCall(name=name)
    tc.arguments.update(arguments)
    return tc


def output(
    content: str = "", calls: list[item_pb2.ToolCall] | None = None, latency_ms: float = 0.0, cost_usd: float = 0.0
) -> item_pb2.Response:
    """A target response."""
    return item_pb2.Response(content=content, tool_calls=calls or [], latency_ms=latency_ms, cost_usd=cost_usd)


def grade(spec: grader_pb2.Grader, it: item_pb2.Item, out: item_pb2.Response) -> Grade:
    """Validate, compile and grade, as a run does; a case with an invalid spec is a bug in the table."""
    assert validate_grader(spec, "g") == []
    result = compile_grader(spec).grade(it, out)
    assert 0.0 <= result.score <= 1.0
    assert result.explanation
    assert (result.state == ERROR) == bool(result.error_reason)
    return result


# ------------------------------------------------------------------------------------- exact_match

EXACT = grader_pb2.ExactMatch


@pytest.mark.parametrize(
    ("opts", "expected", "content", "state"),
    [
        pytest.param(EXACT(), "Paris", "Paris", PASSED, id="equal"),
        pytest.param(EXACT(), "Paris", "paris", FAILED, id="case-differs-sensitive"),
        pytest.param(EXACT(case_insensitive=True), "Paris", "pARIS", PASSED, id="case-differs-insensitive"),
        pytest.param(EXACT(case_insensitive=True), "Straße", "STRASSE", PASSED, id="casefold-unicode"),
        pytest.param(EXACT(), "Paris", " Paris ", FAILED, id="whitespace-differs-not-normalized"),
        pytest.param(
            EXACT(normalize_whitespace=True), "New  York", "\tNew\nYork  ", PASSED, id="whitespace-normalized"
        ),
        pytest.param(
            EXACT(normalize_whitespace=True), "NewYork", "New York", FAILED, id="normalize-keeps-single-space"
        ),
        pytest.param(
            EXACT(case_insensitive=True, normalize_whitespace=True),
            " new york",
            "NEW   YORK\n",
            PASSED,
            id="case-and-whitespace",
        ),
        pytest.param(EXACT(), "", "", PASSED, id="both-empty"),
        pytest.param(EXACT(), "Paris", "", FAILED, id="empty-output"),
    ],
)
def test_exact_match(opts: grader_pb2.ExactMatch, expected: str, content: str, state: int) -> None:
    result = grade(grader_pb2.Grader(exact_match=opts), item(expected), output(content))
    assert result.state == state
    assert result.score == result.raw_score == (1.0 if state == PASSED else 0.0)
    if state == FAILED:
        assert result.explanation == "output differs from expected output"


# ---------------------------------------------------------------------------------------- contains


@pytest.mark.parametrize(
    ("opts", "content", "state", "score", "raw"),
    [
        pytest.param({"values": ["cat"]}, "a cat sat", PASSED, 1.0, 1.0, id="single-found"),
        pytest.param({"values": ["dog"]}, "a cat sat", FAILED, 0.0, 0.0, id="single-missing"),
        pytest.param({"values": ["cat", "dog"]}, "a cat sat", PASSED, 1.0, 0.5, id="any-one-of-two"),
        pytest.param({"values": ["cow", "dog"]}, "a cat sat", FAILED, 0.0, 0.0, id="any-none"),
        pytest.param({"values": ["cat", "sat"], "all": True}, "a cat sat", PASSED, 1.0, 1.0, id="all-found"),
        pytest.param(
            {"values": ["cat", "dog", "cow", "sat"], "all": True}, "a cat sat", FAILED, 0.5, 0.5, id="all-half-found"
        ),
        pytest.param({"values": ["CAT"]}, "a cat", FAILED, 0.0, 0.0, id="case-sensitive"),
        pytest.param({"values": ["CAT"], "case_insensitive": True}, "a cat", PASSED, 1.0, 1.0, id="case-insensitive"),
        pytest.param(
            {"values": ["Cat", "SAT"], "all": True, "case_insensitive": True},
            "A CAT sat",
            PASSED,
            1.0,
            1.0,
            id="all-case-insensitive",
        ),
        pytest.param({"values": ["cat"]}, "", FAILED, 0.0, 0.0, id="empty-output"),
    ],
)
def test_contains(opts: dict[str, Any], content: str, state: int, score: float, raw: float) -> None:
    result = grade(grader_pb2.Grader(contains=grader_pb2.Contains(**opts)), item(), output(content))
    assert (result.state, result.score, result.raw_score) == (state, score, raw)


def test_contains_explanation_names_missing_values() -> None:
    spec = grader_pb2.Grader(contains=grader_pb2.Contains(values=["cat", "dog"], all=True))
    result = grade(spec, item(), output("a cat"))
    assert result.explanation == "output is missing 1 of 2 values: 'dog'"


# ------------------------------------------------------------------------------------------- regex


@pytest.mark.parametrize(
    ("opts", "expected", "content", "state"),
    [
        pytest.param({"pattern": r"\d+"}, "", "order 66", PASSED, id="search-anywhere"),
        pytest.param({"pattern": r"\d+", "full_match": True}, "", "order 66", FAILED, id="full-match-fails"),
        pytest.param({"pattern": r"\d+", "full_match": True}, "", "66", PASSED, id="full-match-passes"),
        pytest.param({"pattern": "^yes$"}, "", "no", FAILED, id="no-match"),
        pytest.param({"pattern": "yes"}, "", "YES", FAILED, id="case-sensitive"),
        pytest.param({"pattern": "yes", "case_insensitive": True}, "", "YES", PASSED, id="case-insensitive"),
        pytest.param({}, r"[A-Z]\w+", "hello Paris", PASSED, id="per-item-pattern"),
        pytest.param({}, r"[A-Z]\w+", "hello paris", FAILED, id="per-item-pattern-no-match"),
        pytest.param({"full_match": True}, r"[a-z]+", "hello paris", FAILED, id="per-item-full-match"),
        pytest.param({"case_insensitive": True}, r"PARIS", "paris", PASSED, id="per-item-case-insensitive"),
        pytest.param({"pattern": "x"}, "(unbalanced", "x", PASSED, id="fixed-pattern-ignores-expected"),
    ],
)
def test_regex(opts: dict[str, Any], expected: str, content: str, state: int) -> None:
    result = grade(grader_pb2.Grader(regex=grader_pb2.Regex(**opts)), item(expected), output(content))
    assert result.state == state
    assert result.score == result.raw_score == (1.0 if state == PASSED else 0.0)


@pytest.mark.parametrize(
    "expected",
    [
        pytest.param("(unbalanced", id="unbalanced-paren"),
        pytest.param("*", id="nothing-to-repeat"),
        pytest.param("", id="empty-pattern"),
    ],
)
def test_regex_bad_per_item_pattern_is_error(expected: str) -> None:
    grader = compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex()))
    for _ in range(2):  # the second time comes from the cache
        result = grader.grade(item(expected), output("anything"))
        assert result.state == ERROR
        assert result.error_reason
        assert result.score == 0.0


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        pytest.param(r"(a)\1", r"backreference \1", id="backreference"),
        pytest.param(r"(?P<w>a)(?P=w)", "named backreference", id="named-backreference"),
        pytest.param(r"foo(?=bar)", "lookahead (?=", id="lookahead"),
        pytest.param(r"foo(?!bar)", "negative lookahead (?!", id="negative-lookahead"),
        pytest.param(r"(?<=x)foo", "lookbehind (?<=", id="lookbehind"),
        pytest.param(r"(?<!x)foo", "negative lookbehind (?<!", id="negative-lookbehind"),
        pytest.param(r"a++", "possessive quantifier ++", id="possessive"),
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_naming_the_construct(pattern: str, construct: str) -> None:
    [violation] = validate_grader(grader_pb2.Grader(regex=grader_pb2.Regex(pattern=pattern)), "graders[0]")
    assert violation.field == "graders[0].regex.pattern"
    assert construct in violation.description and "RE2" in violation.description
    per_item = compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex())).grade(item(pattern), output("aa"))
    assert per_item.state == ERROR and construct in per_item.error_reason


def test_a_catastrophic_backtracking_pattern_runs_in_linear_time() -> None:
    """`^(a+)+$` takes Python's re exponential time on `a...a!`; RE2 answers at once, whatever the length."""
    grader = compile_grader(grader_pb2.Grader(regex=grader_pb2.Regex(pattern="^(a+)+$")))
    started = time.perf_counter()
    for length in (31, 10_000, 1_000_000):
        assert grader.grade(item(""), output("a" * length + "!")).state == FAILED
    assert time.perf_counter() - started < 2.0  # Python's re would take hours on the first one alone
    assert grader.grade(item(""), output("a" * 31)).state == PASSED


# -------------------------------------------------------------------------------------- json_match


@pytest.mark.parametrize(
    ("opts", "expected", "content", "state"),
    [
        pytest.param({}, '{"a": 1, "b": [1, 2]}', '{"b": [1, 2], "a": 1}', PASSED, id="equal-key-order-ignored"),
        pytest.param({}, '{"a": 1}', '{"a": 1.0}', PASSED, id="int-equals-float"),
        pytest.param({}, '{"a": 1}', '{"a": true}', FAILED, id="true-is-not-1"),
        pytest.param({}, '{"a": false}', '{"a": 0}', FAILED, id="false-is-not-0"),
        pytest.param({}, '{"a": 1}', '{"a": 1, "b": 2}', FAILED, id="equal-rejects-extra-key"),
        pytest.param({}, '{"a": 1, "b": 2}', '{"a": 1}', FAILED, id="equal-rejects-missing-key"),
        pytest.param({}, "[1, 2]", "[2, 1]", FAILED, id="list-order-matters"),
        pytest.param({}, '"x"', '  "x"  ', PASSED, id="scalar-with-whitespace"),
        pytest.param({}, "null", "null", PASSED, id="null"),
        pytest.param({"subset": True}, '{"a": 1}', '{"a": 1, "b": 2}', PASSED, id="subset-extra-key"),
        pytest.param(
            {"subset": True},
            '{"a": {"b": [{"c": 1}]}}',
            '{"a": {"b": [{"c": 1, "d": 2}], "e": 3}, "f": 4}',
            PASSED,
            id="subset-nested",
        ),
        pytest.param(
            {"subset": True}, '{"a": {"b": [{"c": 1}]}}', '{"a": {"b": [{"c": 2}]}}', FAILED, id="subset-nested-differs"
        ),
        pytest.param({"subset": True}, '{"a": [1]}', '{"a": [1, 2]}', FAILED, id="subset-list-length-differs"),
        pytest.param({"subset": True}, '{"a": 1, "z": 1}', '{"a": 1}', FAILED, id="subset-missing-key"),
        pytest.param({"subset": True}, '{"a": {}}', '{"a": []}', FAILED, id="subset-type-differs"),
        pytest.param({"subset": True}, "[1]", "[1]", PASSED, id="subset-scalars-list"),
        pytest.param({"valid_only": True}, "not json at all", "[1, 2]", PASSED, id="valid-only-ignores-expected"),
        pytest.param({"valid_only": True}, "", "{", FAILED, id="valid-only-invalid"),
        pytest.param({}, "{}", "{'a': 1}", FAILED, id="single-quotes-invalid"),
        pytest.param({}, "1", "NaN", FAILED, id="nan-invalid"),
        pytest.param({}, "1", "", FAILED, id="empty-output-invalid"),
    ],
)
def test_json_match(opts: dict[str, Any], expected: str, content: str, state: int) -> None:
    result = grade(grader_pb2.Grader(json_match=grader_pb2.JsonMatch(**opts)), item(expected), output(content))
    assert result.state == state
    assert result.score == (1.0 if state == PASSED else 0.0)


def test_json_match_invalid_output_explains() -> None:
    result = grade(grader_pb2.Grader(json_match=grader_pb2.JsonMatch()), item("{}"), output("{oops"))
    assert result.state == FAILED
    assert result.explanation.startswith("output is not valid JSON")


def test_json_match_mismatch_names_path() -> None:
    spec = grader_pb2.Grader(json_match=grader_pb2.JsonMatch(subset=True))
    result = grade(spec, item('{"a": {"b": [1, 2]}}'), output('{"a": {"b": [1, 3]}}'))
    assert result.explanation == "output JSON does not contain expected JSON at $.a.b[1]: value differs"


def test_json_match_names_the_first_difference_in_document_order() -> None:
    spec = grader_pb2.Grader(json_match=grader_pb2.JsonMatch())
    result = grade(spec, item('{"a": {"x": 1}, "b": 2, "c": [1]}'), output('{"a": {"x": 2}, "c": [1, 2]}'))
    assert result.explanation == "output JSON differs from expected JSON at $.a.x: value differs"


def test_json_match_says_when_the_output_is_nested_too_deeply_to_read() -> None:
    """5,000 levels, past Python's parser (~1,000, less the caller's own stack): the grader's ERROR saying
    so, not RecursionError out of the grader; a deep document it can read is compared as any other."""
    spec = grader_pb2.Grader(json_match=grader_pb2.JsonMatch())
    deep = "[" * 200 + "1" + "]" * 200
    assert grade(spec, item(deep), output(deep)).state == PASSED
    deeper = "[" * 5000 + "1" + "]" * 5000
    result = grade(spec, item("[1]"), output(deeper))
    assert result.state == ERROR and result.error_reason.startswith("output: its JSON is nested too deeply"), result


@pytest.mark.parametrize(
    "expected",
    [pytest.param("", id="empty"), pytest.param("{not json", id="broken"), pytest.param("Infinity", id="infinity")],
)
def test_json_match_expected_not_json_is_error(expected: str) -> None:
    result = grade(grader_pb2.Grader(json_match=grader_pb2.JsonMatch()), item(expected), output("{}"))
    assert result.state == ERROR
    assert result.error_reason.startswith("expected_output is not valid JSON")


# -------------------------------------------------------------------------------------- similarity


@pytest.mark.parametrize(
    ("opts", "expected", "content", "state", "ratio"),
    [
        pytest.param({}, "hello", "hello", PASSED, 1.0, id="identical"),
        pytest.param({}, "abcde", "abcdx", PASSED, 0.8, id="default-threshold-boundary-passes"),
        pytest.param({}, "abcd", "abce", FAILED, 0.75, id="below-default-threshold"),
        pytest.param({"threshold": 0.75}, "abcd", "abce", PASSED, 0.75, id="custom-threshold-boundary-passes"),
        pytest.param({"threshold": 0.76}, "abcd", "abce", FAILED, 0.75, id="just-below-custom-threshold"),
        pytest.param({"threshold": 1.0}, "abcd", "abcd", PASSED, 1.0, id="threshold-one-identical"),
        pytest.param({}, "HELLO", "hello", FAILED, 0.0, id="case-sensitive"),
        pytest.param({"case_insensitive": True}, "HELLO", "hello", PASSED, 1.0, id="case-insensitive"),
        pytest.param({}, "", "", PASSED, 1.0, id="both-empty"),
        pytest.param({}, "abc", "", FAILED, 0.0, id="empty-output"),
    ],
)
def test_similarity(opts: dict[str, Any], expected: str, content: str, state: int, ratio: float) -> None:
    result = grade(grader_pb2.Grader(similarity=grader_pb2.Similarity(**opts)), item(expected), output(content))
    assert result.state == state
    assert result.score == pytest.approx(ratio)
    assert result.raw_score == pytest.approx(ratio)


# -------------------------------------------------------------------------------------- tool_calls

TOOLS = grader_pb2.ToolCalls


def tools_spec(
    expected: list[str] | None = None,
    allow_additional: bool = False,
    arguments: dict[str, dict[str, Any]] | None = None,
) -> grader_pb2.Grader:
    """A tool_calls grader with expected arguments given as plain dicts."""
    spec = grader_pb2.Grader(tool_calls=TOOLS(expected=expected or [], allow_additional=allow_additional))
    for name, args in (arguments or {}).items():
        spec.tool_calls.expected_arguments[name].update(args)
    return spec


@pytest.mark.parametrize(
    ("spec", "tools", "calls", "state", "score", "words"),
    [
        pytest.param(tools_spec(["search"]), None, [call("search")], PASSED, 1.0, [], id="exact-set"),
        pytest.param(
            tools_spec(["search", "fetch"]),
            None,
            [call("fetch"), call("search"), call("search")],
            PASSED,
            1.0,
            [],
            id="any-order-and-repeats",
        ),
        pytest.param(
            tools_spec(["search", "fetch"]), None, [call("search")], FAILED, 0.5, ["missing", "'fetch'"], id="missing"
        ),
        pytest.param(tools_spec(["search"]), None, [], FAILED, 0.0, ["missing", "'search'"], id="no-calls"),
        pytest.param(
            tools_spec(["search"]),
            None,
            [call("search"), call("delete")],
            FAILED,
            0.5,
            ["additional", "'delete'"],
            id="additional-fails",
        ),
        pytest.param(
            tools_spec(["search"], allow_additional=True),
            None,
            [call("search"), call("delete")],
            PASSED,
            1.0,
            ["allowed", "'delete'"],
            id="additional-allowed",
        ),
        pytest.param(
            tools_spec(["search"], allow_additional=True),
            None,
            [call("delete")],
            FAILED,
            0.0,
            ["missing"],
            id="allowed-but-missing",
        ),
        pytest.param(tools_spec(), ["fetch"], [call("fetch")], PASSED, 1.0, [], id="item-expected"),
        pytest.param(
            tools_spec(), ["fetch"], [call("search")], FAILED, 0.0, ["missing", "additional"], id="item-expected-fails"
        ),
        pytest.param(tools_spec(["search"]), ["fetch"], [call("search")], PASSED, 1.0, [], id="spec-overrides-item"),
        pytest.param(
            tools_spec(["search"], arguments={"search": {"q": "paris", "n": 3}}),
            None,
            [call("search", q="london", n=3), call("search", q="paris", n=3.0, lang="fr")],
            PASSED,
            1.0,
            [],
            id="arguments-one-call-matches-extra-keys-ok",
        ),
        pytest.param(
            tools_spec(["search"], arguments={"search": {"q": "paris"}}),
            None,
            [call("search", q="london")],
            FAILED,
            0.5,
            ["expected arguments", "'search'"],
            id="arguments-differ",
        ),
        pytest.param(
            tools_spec(["search"], arguments={"search": {"q": "paris", "n": 3}}),
            None,
            [call("search", q="paris")],
            FAILED,
            0.5,
            ["expected arguments"],
            id="arguments-key-missing",
        ),
        pytest.param(
            tools_spec(["search"], arguments={"search": {"exact": True}}),
            None,
            [call("search", exact=1)],
            FAILED,
            0.5,
            ["expected arguments"],
            id="arguments-true-is-not-1",
        ),
        pytest.param(
            tools_spec(["search"], arguments={"search": {"filter": {"tags": ["a", "b"]}}}),
            None,
            [call("search", filter={"tags": ["a", "b"]})],
            PASSED,
            1.0,
            [],
            id="arguments-nested-equal",
        ),
        pytest.param(
            tools_spec(["search"], arguments={"search": {"filter": {"tags": ["a"]}}}),
            None,
            [call("search", filter={"tags": ["a"], "more": 1})],
            FAILED,
            0.5,
            ["expected arguments"],
            id="arguments-nested-values-compared-by-equality",
        ),
        pytest.param(
            tools_spec(arguments={"search": {"q": "x"}}),
            None,
            [call("search", q="x")],
            PASSED,
            1.0,
            [],
            id="arguments-imply-expected-name",
        ),
        pytest.param(
            tools_spec(["fetch"], arguments={"search": {"q": "x"}}),
            None,
            [call("fetch")],
            FAILED,
            1 / 3,
            ["missing", "'search'", "expected arguments"],
            id="arguments-tool-never-called",
        ),
    ],
)
def test_tool_calls(
    spec: grader_pb2.Grader,
    tools: list[str] | None,
    calls: list[item_pb2.ToolCall],
    state: int,
    score: float,
    words: list[str],
) -> None:
    result = grade(spec, item(tools=tools), output(calls=calls))
    assert result.state == state
    assert result.score == pytest.approx(score)
    for word in words:
        assert word in result.explanation


def test_tool_calls_without_any_expected_is_error() -> None:
    result = grade(tools_spec(), item(), output(calls=[call("search")]))
    assert result.state == ERROR
    assert "no expected tool calls" in result.error_reason


def test_tool_calls_nan_argument_matches_nothing() -> None:
    bad = call("search")
    bad.arguments["q"] = math.nan
    result = grade(tools_spec(["search"], arguments={"search": {"q": 1}}), item(), output(calls=[bad]))
    assert result.state == FAILED


# ---------------------------------------------------------------------------------- latency / cost


@pytest.mark.parametrize(
    ("max_ms", "latency", "state", "explanation"),
    [
        pytest.param(200.0, 120.0, PASSED, "latency 120 ms <= 200 ms", id="under"),
        pytest.param(200.0, 200.0, PASSED, "latency 200 ms <= 200 ms", id="equal-passes"),
        pytest.param(200.0, 200.04, FAILED, "latency 200 ms > 200 ms", id="just-over"),
        pytest.param(200.0, 1500.5, FAILED, "latency 1500.5 ms > 200 ms", id="over"),
        pytest.param(0.5, 0.01, PASSED, "latency 0 ms <= 0.5 ms", id="tiny-latency"),
    ],
)
def test_latency(max_ms: float, latency: float, state: int, explanation: str) -> None:
    spec = grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=max_ms))
    result = grade(spec, item(), output(latency_ms=latency))
    assert (result.state, result.raw_score, result.explanation) == (state, latency, explanation)
    assert result.score == (1.0 if state == PASSED else 0.0)


def test_latency_of_an_output_without_one_is_an_error() -> None:
    """A recorded response without latency_ms (or an echo's output) has none: the aggregate leaves it out,
    so the grader must not pass it as "latency 0 ms"."""
    spec = grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=100))
    result = grade(spec, item(), output())
    assert result.state == ERROR
    assert result.error_reason.startswith("no latency: ")
    assert result.explanation == "the output has no latency to grade"


@pytest.mark.parametrize(
    ("max_usd", "cost", "state", "explanation"),
    [
        pytest.param(0.01, 0.0012, PASSED, "cost $0.0012 <= $0.01", id="under"),
        pytest.param(0.01, 0.01, PASSED, "cost $0.01 <= $0.01", id="equal-passes"),
        pytest.param(0.01, 0.02, FAILED, "cost $0.02 > $0.01", id="over"),
        pytest.param(0.0, 0.0, PASSED, "cost $0 <= $0", id="zero-max-free-output"),
        pytest.param(0.0, 0.000001, FAILED, "cost $0.000001 > $0", id="zero-max-paid-output"),
    ],
)
def test_cost(max_usd: float, cost: float, state: int, explanation: str) -> None:
    spec = grader_pb2.Grader(cost=grader_pb2.Cost(max_usd=max_usd))
    result = grade(spec, item(), output(cost_usd=cost))
    assert (result.state, result.raw_score, result.explanation) == (state, cost, explanation)
    assert result.score == (1.0 if state == PASSED else 0.0)


# ------------------------------------------------------------------------------ name, weight, errors


@pytest.mark.parametrize(
    ("spec", "name", "weight"),
    [
        pytest.param(grader_pb2.Grader(exact_match=EXACT()), "exact_match", 1.0, id="defaults-exact-match"),
        pytest.param(grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=1)), "latency", 1.0, id="defaults-latency"),
        pytest.param(
            grader_pb2.Grader(name="fast", weight=2.5, latency=grader_pb2.Latency(max_ms=1)),
            "fast",
            2.5,
            id="explicit-name-and-weight",
        ),
    ],
)
def test_name_and_weight(spec: grader_pb2.Grader, name: str, weight: float) -> None:
    compiled = compile_grader(spec)
    assert grader_name(spec) == compiled.name == name
    assert compiled.weight == weight


def test_target_error_grade() -> None:
    result = target_error_grade("TimeoutError: target took too long")
    assert result.state == ERROR
    assert result.score == 0.0
    assert result.error_reason == "TimeoutError: target took too long"
    assert result.explanation


def test_compile_rejects_unset_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        compile_grader(grader_pb2.Grader(name="x"))


def violations(spec: grader_pb2.Grader) -> list[tuple[str, str]]:
    """The violations of a spec at path graders[2], as (field, description) pairs."""
    found = validate_grader(spec, "graders[2]")
    assert all(isinstance(v, FieldViolation) and v.description for v in found)
    return [(v.field, v.description) for v in found]


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        pytest.param(grader_pb2.Grader(), ["graders[2]"], id="kind-unset"),
        pytest.param(grader_pb2.Grader(name="x" * 63, exact_match=EXACT()), [], id="name-63-ok"),
        pytest.param(grader_pb2.Grader(name="x" * 64, exact_match=EXACT()), ["graders[2].name"], id="name-too-long"),
        pytest.param(grader_pb2.Grader(weight=-1, exact_match=EXACT()), ["graders[2].weight"], id="weight-negative"),
        pytest.param(grader_pb2.Grader(weight=math.inf, exact_match=EXACT()), ["graders[2].weight"], id="weight-inf"),
        pytest.param(grader_pb2.Grader(weight=math.nan, exact_match=EXACT()), ["graders[2].weight"], id="weight-nan"),
        pytest.param(
            grader_pb2.Grader(contains=grader_pb2.Contains()), ["graders[2].contains.values"], id="contains-no-values"
        ),
        pytest.param(
            grader_pb2.Grader(contains=grader_pb2.Contains(values=["a", "", "b"])),
            ["graders[2].contains.values[1]"],
            id="contains-empty-value",
        ),
        pytest.param(
            grader_pb2.Grader(regex=grader_pb2.Regex(pattern="(a")), ["graders[2].regex.pattern"], id="regex-invalid"
        ),
        pytest.param(grader_pb2.Grader(regex=grader_pb2.Regex(pattern="")), [], id="regex-empty-uses-item"),
        pytest.param(
            grader_pb2.Grader(similarity=grader_pb2.Similarity(threshold=1.5)),
            ["graders[2].similarity.threshold"],
            id="similarity-above-one",
        ),
        pytest.param(
            grader_pb2.Grader(similarity=grader_pb2.Similarity(threshold=-0.1)),
            ["graders[2].similarity.threshold"],
            id="similarity-negative",
        ),
        pytest.param(
            grader_pb2.Grader(similarity=grader_pb2.Similarity(threshold=math.nan)),
            ["graders[2].similarity.threshold"],
            id="similarity-nan",
        ),
        pytest.param(grader_pb2.Grader(similarity=grader_pb2.Similarity(threshold=1.0)), [], id="similarity-one-ok"),
        pytest.param(
            tools_spec(arguments={"": {"q": 1}}), ["graders[2].tool_calls.expected_arguments"], id="tools-empty-key"
        ),
        pytest.param(tools_spec(["a", ""]), ["graders[2].tool_calls.expected[1]"], id="tools-empty-expected-name"),
        pytest.param(tools_spec(), [], id="tools-empty-uses-item"),
        pytest.param(
            grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=0)), ["graders[2].latency.max_ms"], id="latency-zero"
        ),
        pytest.param(
            grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=-5)),
            ["graders[2].latency.max_ms"],
            id="latency-negative",
        ),
        pytest.param(
            grader_pb2.Grader(cost=grader_pb2.Cost(max_usd=-0.01)), ["graders[2].cost.max_usd"], id="cost-negative"
        ),
        pytest.param(grader_pb2.Grader(cost=grader_pb2.Cost(max_usd=0)), [], id="cost-zero-ok"),
        pytest.param(
            grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id="grd_x", version=-1)),
            ["graders[2].saved.version"],
            id="saved-version-negative",
        ),
        pytest.param(grader_pb2.Grader(saved=grader_pb2.SavedGraderRef(grader_id="grd_x")), [], id="saved-latest-ok"),
        pytest.param(
            grader_pb2.Grader(name="y" * 100, weight=-2),
            ["graders[2].name", "graders[2].weight", "graders[2]"],
            id="collects-every-violation",
        ),
    ],
)
def test_validate_grader(spec: grader_pb2.Grader, fields: list[str]) -> None:
    assert [f for f, _ in violations(spec)] == fields


def test_an_unset_kind_names_the_grader_and_its_choices_not_the_oneof() -> None:
    """`kind` is a oneof, which no field path reaches (AIP-193): the violation names the grader."""
    [(field, description)] = violations(grader_pb2.Grader())
    assert field == "graders[2]"
    assert description.startswith("set exactly one of exact_match, contains, regex"), description
    assert "llm_judge" in description and "saved" in description


def test_validate_rejects_nan_in_expected_arguments() -> None:
    spec = tools_spec(["search"])
    spec.tool_calls.expected_arguments["search"]["q"] = math.inf
    assert [f for f, _ in violations(spec)] == ['graders[2].tool_calls.expected_arguments["search"]']


# ---------------------------------------------------------------------------------- never raises

WEIRD_OUTPUTS = [
    output(),
    output("\x00\U0010ffff", latency_ms=math.nan, cost_usd=-math.inf),
    output("[" * 20_000 + "]" * 20_000),  # too deep for the json module
    output("{" * 20_000),
    output("x" * 200_000, latency_ms=math.inf, cost_usd=math.nan),
    output('{"a": NaN}', calls=[call(""), call("search", q=None, deep={"a": [[[{}]]]})]),
]
WEIRD_ITEMS = [
    item(),
    item("[" * 20_000 + "]" * 20_000, tools=["", "search"]),
    item("(?P<x>", tools=["x" * 1000]),
    item("\x00", tools=["search", "search"]),
]
ALL_KINDS = [
    grader_pb2.Grader(exact_match=EXACT(case_insensitive=True, normalize_whitespace=True)),
    grader_pb2.Grader(contains=grader_pb2.Contains(values=["a"], all=True, case_insensitive=True)),
    grader_pb2.Grader(regex=grader_pb2.Regex(full_match=True)),
    grader_pb2.Grader(regex=grader_pb2.Regex(pattern="a+", case_insensitive=True)),
    grader_pb2.Grader(json_match=grader_pb2.JsonMatch(subset=True)),
    grader_pb2.Grader(json_match=grader_pb2.JsonMatch()),
    grader_pb2.Grader(similarity=grader_pb2.Similarity(threshold=0.5, case_insensitive=True)),
    tools_spec(arguments={"search": {"q": None, "deep": {"a": [[[{}]]]}}}),
    tools_spec(["search"], allow_additional=True),
    grader_pb2.Grader(latency=grader_pb2.Latency(max_ms=100)),
    grader_pb2.Grader(cost=grader_pb2.Cost(max_usd=1)),
]


@pytest.mark.parametrize("spec", ALL_KINDS, ids=[grader_name(s) + f"-{i}" for i, s in enumerate(ALL_KINDS)])
def test_grade_never_raises_on_weird_inputs(spec: grader_pb2.Grader) -> None:
    assert validate_grader(spec, "g") == []
    grader = compile_grader(spec)
    for it in WEIRD_ITEMS:
        for out in WEIRD_OUTPUTS:
            result = grader.grade(it, out)
            assert result.state in (PASSED, FAILED, ERROR)
            assert 0.0 <= result.score <= 1.0
            assert (result.state == ERROR) == bool(result.error_reason)


def test_unexpected_exception_becomes_error_grade() -> None:
    grader = compile_grader(grader_pb2.Grader(exact_match=EXACT()))
    result = grader.grade(None, output("x"))  # type: ignore[arg-type]
    assert result.state == ERROR
    assert result.error_reason.startswith("GRADER_FAILED: AttributeError: ")  # the code docs/errors.md documents
    assert result.score == 0.0


@pytest.mark.parametrize(
    ("opts", "expected", "content", "explanation"),
    [
        pytest.param({"pattern": r"\d+"}, "", "66", r"output matches /\d+/", id="fixed-pass"),
        pytest.param(
            {"pattern": r"\d+", "full_match": True}, "", "a", r"output does not fully match /\d+/", id="fixed-fail"
        ),
        pytest.param({}, "a{2}", "b", "output does not match /a{2}/", id="per-item-fail"),
    ],
)
def test_regex_explanation(opts: dict[str, Any], expected: str, content: str, explanation: str) -> None:
    result = grade(grader_pb2.Grader(regex=grader_pb2.Regex(**opts)), item(expected), output(content))
    assert result.explanation == explanation
