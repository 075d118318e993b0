"""The built-in graders: exact match, contains, regex, JSON, similarity, tool calls, latency and cost.

Each `Grader` spec is compiled once per run into a small object with `__slots__`; everything that
does not depend on the item (regexes, case-folded values, parsed expected arguments, fixed grades)
is worked out then, because `grade` runs for every item x repetition x grader, up to hundreds of
thousands of times in one run. Constant outcomes reuse one preallocated `Grade`.

`grade` never raises: a grader that cannot judge an output (bad per-item pattern, expected output
that is not JSON, an unexpected exception) returns an ERROR grade, which the run reports and
excludes from the pass rate, instead of failing the whole job.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import re2
from rapidfuzz import fuzz

from evalsvc.errors import FieldViolation
from evalsvc.messages.canonical import NOT_JSON_VALUES, struct_values
from evalsvc.messages.oneofs import one_of
from evalsvc.messages.validation import MAX_GRADER_NAME
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

__all__ = [
    "CompiledGrader",
    "Grade",
    "compile_grader",
    "grader_name",
    "plain_pattern",
    "target_error_grade",
    "validate_builtin",
]

PASSED: int = run_pb2.RESULT_STATE_PASSED
FAILED: int = run_pb2.RESULT_STATE_FAILED
ERROR: int = run_pb2.RESULT_STATE_ERROR

DEFAULT_SIMILARITY_THRESHOLD = 0.8
# rapidfuzz computes the ratio in floating point; without a little slack an output that is exactly
# at the threshold (say 4 of 5 characters) could fail by a rounding error.
_SIMILARITY_EPSILON = 1e-9
_QUOTE_LIMIT = 60  # longest user-provided text quoted in an explanation
_LIST_LIMIT = 5  # most names or values listed in an explanation


@dataclass(frozen=True, slots=True)
class Grade:
    """The outcome of grading one output: what the results table stores for one evaluation."""

    state: int  # run_pb2.RESULT_STATE_PASSED / _FAILED / _ERROR
    score: float  # normalised, in [0, 1]
    raw_score: float  # the grader's own measure: similarity ratio, latency ms, cost usd, fraction found...
    explanation: str  # a sentence for a person
    error_reason: str = ""  # non-empty only for ERROR
    cost_usd: float = 0.0  # what grading cost (an LLM judge's tokens); apart from the target's cost
    confidence: float | None = None  # the judge's confidence in [0, 1], where its mode gives one
    cached: bool = False  # an LLM judge's verdict taken from the response cache (no call, no cost)


# ------------------------------------------------------------------------------------------- cost
# What a grading costs on the event loop, estimated before it runs (evalsvc.graders.pool sends one
# estimated over about a millisecond to a worker process). Measured on the 2-core dev machine
# (Python 3.11, google-re2, rapidfuzz; tests/unit/test_grading_pool.py checks the rule, not speed):
#   - casefold + whitespace collapse: 5.5 ns/char; json.loads: 10 ns/char (the diff about as much);
#   - `v in text`: 0.4-0.9 ns per value per char, plus 40-60 ns per value whatever the text; but
#     for long values on short texts the search is O(text x value): 350 values of 1,250 characters on
#     2,499 characters took 93 ms (0.085 ns per value character per text character; 0.1 is counted);
#   - RE2 search: 1.4-1.6 ns/char for an ordinary pattern (`\d+`, `[a-z]+@[a-z]+\.com`, program 6-30);
#     but when its DFA gives up, or the match's groups must be found over a long span, it is the NFA,
#     O(text x program): `(a|b)*a` then `(a|b)` 16 times (program 57) took 9.2 ms on 16 KB of a/b,
#     8.6-10 ns per instruction per char; `(?s)(.{1000}|x)(.{1000}|y)(.{1000}|z)(.{1000}|w)`
#     (program 28,016) 80-100 ms on 16 KB. The estimate takes the worst: 10 ns per instruction per
#     char (so an ordinary 16-instruction pattern stays inline up to ~6k characters);
#   - rapidfuzz ratio: 0.02 ns per char of one text per char of the other (5 ms at 16k x 16k).
NS_PER_CHAR_NORMALIZE = 6.0
NS_PER_CHAR_JSON = 20.0
NS_PER_VALUE_CHAR = 1.0
NS_PER_VALUE = 60.0
NS_PER_VALUE_CHAR_PAIR = 0.1
NS_PER_CHAR_REGEX = 1.5
NS_PER_INSTRUCTION_CHAR = 10.0
NS_PER_CHAR_PAIR = 0.02
NS_PER_EXPECTED_NAME = 500.0  # an item's expected tool call: deduplicated, looked up (200,000 took 73 ms)
# A per-item pattern is compiled on the loop only when it is plain (`plain_pattern`): RE2's compile
# cost follows the pattern's expansion, not its length (`\pL{1000}`, 9 characters, took 42 ms to fail
# with "pattern too large"), so any other goes to a worker with its grading. A plain one can still
# expand: `(\W` x 60 `){64}` (126 characters, case-insensitive) compiles in 16.8 ms under RE2's default
# max_mem, and `(\W` x 12 `){32}` compiled (program 10,438) in 2.4 ms within 256 KiB. Within
# PLAIN_PATTERN_MAX_MEM (64 KiB) such patterns fail as too large in a fraction of a millisecond, and a
# plain pattern too large within that bound is compiled by the worker that grades it.
PLAIN_PATTERN_CHARS = 128
PLAIN_PATTERN_REPEAT = 64  # the product of a plain pattern's repetition counts
PLAIN_PATTERN_MAX_MEM = 64 * 1024  # RE2 program memory for a per-item pattern compiled on the loop
_COUNTED = re2.compile(r"\{(\d+)(?:,(\d*))?\}")


def plain_pattern(pattern: str) -> bool:
    """Whether a per-item pattern is cheap to compile, judged from its text alone: short, no Unicode
    classes (\\p, \\P: hundreds of instructions each) and few repetitions in total."""
    if len(pattern) > PLAIN_PATTERN_CHARS or "\\p" in pattern or "\\P" in pattern:
        return False
    product = 1
    for low, high in _COUNTED.findall(pattern):
        product *= max(int(low), int(high or 0), 1)
        if product > PLAIN_PATTERN_REPEAT:
            return False
    return True


class CompiledGrader(Protocol):
    """A grader ready to grade outputs; built once per run by `compile_grader`."""

    name: str
    weight: float
    kind: str  # the spec's kind: `regex`, `similarity`...
    spec_bytes: bytes  # the serialized spec, from which a worker process builds the same grader
    item_dependent: bool  # whether `cost_ns` depends on the item beyond the text's size (per-item pattern)

    def cost_ns(self, item: item_pb2.Item, chars: int) -> float:
        """Estimated nanoseconds to grade `chars` characters of text for this item (see `_Base`)."""
        ...

    def grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        """Grade one output for one item. Never raises."""
        ...


# --------------------------------------------------------------------------------------------- helpers


def _error(explanation: str, reason: str) -> Grade:
    return Grade(ERROR, 0.0, 0.0, explanation, reason)


def target_error_grade(reason: str) -> Grade:
    """The grade every grader gets when the target failed for an item: there is no output to judge."""
    return Grade(ERROR, 0.0, 0.0, "the target failed for this item, so its output could not be graded", reason)


GRADER_FAILED = "GRADER_FAILED"


def grader_failed_grade(exc: Exception, text: str | None = None) -> Grade:
    """The grade of a grader that raised on one output (a bug, or a reply no check foresaw): ERROR for
    that evaluation alone, with a stable code (docs/errors.md). `text` stands for the exception's own
    (which a database error's must not be: it quotes SQL and bound values)."""
    detail = str(exc) if text is None else text
    return Grade(
        ERROR, 0.0, 0.0, "the grader failed on this output", f"{GRADER_FAILED}: {type(exc).__name__}: {detail}"
    )


def _clip(text: str) -> str:
    """Cut user text short so one huge value cannot bloat every result's explanation."""
    return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."


def _quote(text: str) -> str:
    """Quote user text for an explanation, cut short."""
    return repr(_clip(text))


def _slashed(pattern: str) -> str:
    """A pattern as `/pattern/`: backslashes read as written, unlike in repr."""
    return f"/{_clip(pattern)}/"


def _names(values: list[str]) -> str:
    """A short, readable list such as `'a', 'b' and 3 more`."""
    shown = ", ".join(_quote(v) for v in values[:_LIST_LIMIT])
    if len(values) > _LIST_LIMIT:
        shown += f" and {len(values) - _LIST_LIMIT} more"
    return shown


def _number(value: float, decimals: int) -> str:
    """A number without trailing zeros (`120`, `0.0012`), so explanations read naturally."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".") or "0"


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _casefold_collapse(text: str) -> str:
    return " ".join(text.casefold().split())


def _identity(text: str) -> str:
    return text


def _normalizer(case_insensitive: bool, normalize_whitespace: bool = False) -> Callable[[str], str]:
    """Pick the text normalisation once at compile time rather than branching on options per call."""
    if case_insensitive and normalize_whitespace:
        return _casefold_collapse
    if case_insensitive:
        return str.casefold
    if normalize_whitespace:
        return _collapse_whitespace
    return _identity


class _Base:
    """Common state and the never-raise guarantee; subclasses implement `_grade`."""

    __slots__ = ("fixed_ns", "item_dependent", "kind", "name", "per_char_ns", "spec_bytes", "weight")

    name: str
    weight: float
    kind: str
    spec_bytes: bytes
    fixed_ns: float  # estimated cost of a grading whatever the text (e.g. one lookup per contains value)
    per_char_ns: float  # and per character of text read, from the compiled config (0: reads none)

    def __init__(self, spec: grader_pb2.Grader) -> None:
        self.name = grader_name(spec)
        self.weight = spec.weight or 1.0
        self.kind = spec.WhichOneof("kind") or ""
        self.spec_bytes = spec.SerializeToString()
        self.fixed_ns = 0.0
        self.per_char_ns = 0.0
        self.item_dependent = False

    def cost_ns(self, item: item_pb2.Item, chars: int) -> float:
        """Estimated nanoseconds to grade `chars` characters of text (output plus expected output) for
        this item: linear in the text, with factors worked out once from the compiled config."""
        return self.fixed_ns + chars * self.per_char_ns

    def grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        """Grade one output; an unexpected exception becomes this evaluation's ERROR GRADER_FAILED, so one
        bad output cannot fail a job (nor its other graders)."""
        try:
            return self._grade(item, output)
        except Exception as exc:
            return grader_failed_grade(exc)

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- graders


class _ExactMatch(_Base):
    __slots__ = ("_normalize",)

    _PASS = Grade(PASSED, 1.0, 1.0, "output equals expected output")
    _FAIL = Grade(FAILED, 0.0, 0.0, "output differs from expected output")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        opts = spec.exact_match
        self._normalize = _normalizer(opts.case_insensitive, opts.normalize_whitespace)
        self.per_char_ns = NS_PER_CHAR_NORMALIZE

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        norm = self._normalize
        return self._PASS if norm(output.content) == norm(item.expected_output) else self._FAIL


class _Contains(_Base):
    __slots__ = ("_all", "_casefold", "_originals", "_value_chars", "_values")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        opts = spec.contains
        self._all = opts.all
        self._casefold = opts.case_insensitive
        self._originals = tuple(opts.values)
        self._values = tuple(v.casefold() for v in opts.values) if opts.case_insensitive else self._originals
        # One substring search per value: ~28k values cost 0.5 s on 16 KB of text.
        self.fixed_ns = NS_PER_VALUE * len(self._values)
        self.per_char_ns = NS_PER_CHAR_NORMALIZE + NS_PER_VALUE_CHAR * len(self._values)
        self._value_chars = sum(map(len, self._values))

    def cost_ns(self, item: item_pb2.Item, chars: int) -> float:
        """Per value and character, plus, for long values, each value's characters (at most the text's)
        per character: a search can compare a value's length at every place of a short text."""
        pairs = min(self._value_chars, len(self._values) * chars)
        return super().cost_ns(item, chars) + NS_PER_VALUE_CHAR_PAIR * pairs * chars

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        text = output.content.casefold() if self._casefold else output.content
        found = [v in text for v in self._values]
        total = len(found)
        hits = sum(found)
        fraction = hits / total if total else 0.0
        missing = [v for v, hit in zip(self._originals, found, strict=True) if not hit]
        if self._all:
            if not missing:
                return Grade(PASSED, 1.0, 1.0, f"output contains all {total} values")
            return Grade(
                FAILED, fraction, fraction, f"output is missing {len(missing)} of {total} values: {_names(missing)}"
            )
        if hits:
            present = [v for v, hit in zip(self._originals, found, strict=True) if hit]
            return Grade(PASSED, 1.0, fraction, f"output contains {hits} of {total} values: {_names(present)}")
        return Grade(FAILED, 0.0, 0.0, f"output contains none of the values {_names(missing)}")


# What RE2 refuses that people write in Python or Perl patterns, by the text its error quotes.
_UNSUPPORTED_CONSTRUCTS: tuple[tuple[str, str], ...] = (
    ("(?=", "lookahead (?=...)"),
    ("(?!", "negative lookahead (?!...)"),
    ("(?<=", "lookbehind (?<=...)"),
    ("(?<!", "negative lookbehind (?<!...)"),
    ("(?P=", "named backreference (?P=name)"),
    ("(?>", "atomic group (?>...)"),
    ("++", "possessive quantifier ++"),
    ("*+", "possessive quantifier *+"),
    ("?+", "possessive quantifier ?+"),
    ("(?#", "comment group (?#...)"),
)


def _re2_options(case_insensitive: bool) -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the caller's error, reported to them, not logged
    options.case_sensitive = not case_insensitive
    return options


def _explain_re2_error(exc: re2.error, pattern: str) -> str:
    """RE2's message, naming the unsupported construct where it is one people commonly write.

    RE2 quotes only the start of what it refused (`(?P` for `(?P=name)`), so the construct is the
    table's entry that begins with that quote and occurs in the pattern."""
    raw = exc.args[0] if exc.args else ""
    message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    quoted = message.rsplit(": ", 1)[-1]
    construct = next(
        (name for text, name in _UNSUPPORTED_CONSTRUCTS if quoted and text.startswith(quoted) and text in pattern),
        None,
    )
    if construct is None and message.startswith("invalid escape sequence: \\") and quoted[1:].isdigit():
        construct = f"backreference {quoted}"
    if construct is None:
        return message
    return f"{construct} is not supported: regex graders use RE2, which matches in linear time ({message})"


def _compile_pattern(pattern: str, case_insensitive: bool = False) -> re2._Regexp:
    """Compile a pattern with RE2 (linear time in the text, whatever the pattern); raises ValueError
    with a message that names an unsupported construct (backreferences, lookaround)."""
    try:
        return re2.compile(pattern, _re2_options(case_insensitive))
    except re2.error as exc:
        raise ValueError(_explain_re2_error(exc, pattern)) from None


@functools.lru_cache(maxsize=256)
def _compile_item_pattern(pattern: str, case_insensitive: bool, bounded: bool = False) -> re2._Regexp | str:
    """Compile a per-item pattern, or return the compile error; cached since repetitions reuse items.
    `bounded`: within PLAIN_PATTERN_MAX_MEM, as the event loop does (`_Regex.cost_ns`).

    Errors are returned rather than raised because `lru_cache` does not cache exceptions.
    """
    try:
        if bounded:
            options = _re2_options(case_insensitive)
            options.max_mem = PLAIN_PATTERN_MAX_MEM
            try:
                return re2.compile(pattern, options)
            except re2.error as exc:
                raise ValueError(_explain_re2_error(exc, pattern)) from None
        return _compile_pattern(pattern, case_insensitive)
    except ValueError as exc:
        return str(exc)


def _loop_pattern(pattern: str, case_insensitive: bool) -> re2._Regexp | str | None:
    """A per-item pattern as compiled on the event loop (bounded), its error, or None when it is
    not plain or too large within the bound: only a worker process compiles it."""
    if not plain_pattern(pattern):
        return None
    compiled = _compile_item_pattern(pattern, case_insensitive, True)
    if isinstance(compiled, str) and "too large" in compiled:
        return None
    return compiled


class _Regex(_Base):
    __slots__ = ("_case_insensitive", "_fail", "_full", "_pass", "_pattern")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        opts = spec.regex
        self._full = opts.full_match
        self._case_insensitive = opts.case_insensitive
        self._pattern = _compile_pattern(opts.pattern, opts.case_insensitive) if opts.pattern else None
        if self._pattern is not None:
            self.per_char_ns = NS_PER_CHAR_REGEX + NS_PER_INSTRUCTION_CHAR * self._pattern.programsize
        self.item_dependent = self._pattern is None
        verb = "fully matches" if self._full else "matches"
        shown = _slashed(opts.pattern)
        self._pass = Grade(PASSED, 1.0, 1.0, f"output {verb} {shown}")
        self._fail = Grade(FAILED, 0.0, 0.0, f"output does not {'fully ' if self._full else ''}match {shown}")

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        pattern = self._pattern
        if pattern is not None:
            matched = self._match(pattern, output.content)
            return self._pass if matched else self._fail
        source = item.expected_output
        if not source:
            # An empty pattern matches everything; from an item it is almost surely a missing value.
            return _error("the item has no pattern", "no pattern: regex.pattern and expected_output are both empty")
        compiled = _loop_pattern(source, self._case_insensitive) or _compile_item_pattern(
            source, self._case_insensitive
        )
        if isinstance(compiled, str):
            return _error("the item's expected_output is not a pattern RE2 can run", compiled)
        if self._match(compiled, output.content):
            return Grade(PASSED, 1.0, 1.0, f"output {'fully matches' if self._full else 'matches'} {_slashed(source)}")
        return Grade(FAILED, 0.0, 0.0, f"output does not {'fully ' if self._full else ''}match {_slashed(source)}")

    def _match(self, pattern: re2._Regexp, text: str) -> bool:
        return (pattern.fullmatch(text) if self._full else pattern.search(text)) is not None

    def cost_ns(self, item: item_pb2.Item, chars: int) -> float:
        """Linear in the text times the program's size; a per-item pattern's program is known once
        compiled, which only a plain pattern is on the loop (any other costs infinity: a worker)."""
        if self._pattern is not None or not item.expected_output:
            return chars * self.per_char_ns
        compiled = _loop_pattern(item.expected_output, self._case_insensitive)
        if compiled is None:
            return math.inf
        if isinstance(compiled, str):
            return 0.0  # ERROR at once
        return chars * (NS_PER_CHAR_REGEX + NS_PER_INSTRUCTION_CHAR * compiled.programsize)


def _reject_constant(name: str) -> Any:
    """Reject NaN and Infinity, which Python's json accepts but JSON does not."""
    raise ValueError(f"{name} is not valid JSON")


class NestedTooDeeply(ValueError):
    """JSON nested deeper than Python's parser goes (~1,000 levels): valid, but not comparable here."""


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise NestedTooDeeply("its JSON is nested too deeply to be read (over ~1,000 levels)") from None


def _key_path(key: str) -> str:
    return f".{key}" if key.isidentifier() else f"[{json.dumps(key)}]"


_ABSENT = object()  # an expected key the actual object does not have


def _json_diff(expected: Any, actual: Any, subset: bool) -> tuple[str, str] | None:
    """Where and why `actual` does not match `expected`, or None when it does: the first difference in
    document order, depth first.

    JSON-aware: `true` is not `1` (Python says `True == 1`), while `1` equals `1.0`. With `subset`,
    objects in `actual` may have keys that `expected` lacks, at any depth; lists must still have
    the same length and match element by element. Walked with a stack of its own, not recursion: the
    parser already spends the interpreter's recursion limit on a deep document.
    """
    pending: list[tuple[str, Any, Any]] = [("", expected, actual)]
    while pending:
        path, exp, act = pending.pop()
        if act is _ABSENT:
            return path, "missing key"
        if isinstance(exp, dict):
            if not isinstance(act, dict):
                return path, "expected an object"
            if not subset and exp.keys() != act.keys():
                extra = [k for k in act if k not in exp]
                if extra:
                    return path + _key_path(extra[0]), "unexpected key"
            pending.extend((path + _key_path(k), v, act.get(k, _ABSENT)) for k, v in reversed(exp.items()))
            continue
        if isinstance(exp, list):
            if not isinstance(act, list):
                return path, "expected an array"
            if len(exp) != len(act):
                return path, f"expected {len(exp)} elements, got {len(act)}"
            pending.extend((f"{path}[{i}]", exp[i], act[i]) for i in reversed(range(len(exp))))
            continue
        if isinstance(exp, bool) or isinstance(act, bool):
            same = type(exp) is type(act) and exp == act
        elif isinstance(exp, int | float):
            same = isinstance(act, int | float) and exp == act
        else:
            same = type(exp) is type(act) and exp == act
        if not same:
            return path, "value differs"
    return None


class _JsonMatch(_Base):
    __slots__ = ("_subset", "_valid_only")

    _VALID = Grade(PASSED, 1.0, 1.0, "output is valid JSON")
    _EQUAL = Grade(PASSED, 1.0, 1.0, "output JSON equals expected JSON")
    _SUBSET = Grade(PASSED, 1.0, 1.0, "output JSON contains expected JSON")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        self._subset = spec.json_match.subset
        self._valid_only = spec.json_match.valid_only
        self.per_char_ns = NS_PER_CHAR_JSON

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        try:
            actual = _parse_json(output.content)
        except NestedTooDeeply as exc:
            return _error("the output's JSON is nested too deeply to compare", f"output: {exc}")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return Grade(FAILED, 0.0, 0.0, f"output is not valid JSON: {exc}")
        if self._valid_only:
            return self._VALID
        try:
            expected = _parse_json(item.expected_output)
        except ValueError as exc:
            return _error("the item's expected_output is not valid JSON", f"expected_output is not valid JSON: {exc}")
        diff = _json_diff(expected, actual, self._subset)
        if diff is None:
            return self._SUBSET if self._subset else self._EQUAL
        where = "$" + diff[0]
        relation = "does not contain" if self._subset else "differs from"
        return Grade(FAILED, 0.0, 0.0, f"output JSON {relation} expected JSON at {where}: {diff[1]}")


class _Similarity(_Base):
    __slots__ = ("_casefold", "_threshold")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        self._threshold = spec.similarity.threshold or DEFAULT_SIMILARITY_THRESHOLD
        self._casefold = spec.similarity.case_insensitive
        self.per_char_ns = NS_PER_CHAR_NORMALIZE

    def cost_ns(self, item: item_pb2.Item, chars: int) -> float:
        """Quadratic: the expected output's characters times the rest of the text's (the output's)."""
        expected = len(item.expected_output)
        return chars * self.per_char_ns + NS_PER_CHAR_PAIR * expected * max(chars - expected, 0)

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        actual, expected = output.content, item.expected_output
        if self._casefold:
            actual, expected = actual.casefold(), expected.casefold()
        ratio = fuzz.ratio(actual, expected) / 100.0
        threshold = self._threshold
        if ratio + _SIMILARITY_EPSILON >= threshold:
            return Grade(PASSED, ratio, ratio, f"similarity {ratio:.2f} >= threshold {threshold:.2f}")
        return Grade(FAILED, ratio, ratio, f"similarity {ratio:.2f} < threshold {threshold:.2f}")


class _ToolCalls(_Base):
    __slots__ = ("_allow_additional", "_arguments", "_expected", "_expected_set")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        opts = spec.tool_calls
        self._allow_additional = opts.allow_additional
        self._arguments: dict[str, dict[str, Any]] = {}
        for name in sorted(opts.expected_arguments):
            converted = struct_values(opts.expected_arguments[name])
            if converted is None:
                raise ValueError(f"expected_arguments[{name!r}] is not JSON")
            self._arguments[name] = converted
        # Fixed expected names (or None: the item's `expected_tool_calls`), deduplicated in order.
        self._expected: tuple[str, ...] | None = None
        self._expected_set: frozenset[str] = frozenset()
        if opts.expected:
            self._expected = self._with_argument_names(opts.expected)
            self._expected_set = frozenset(self._expected)
        # The calls are read once, and their arguments once more per tool with expected arguments;
        # the expected arguments themselves are compared against each call.
        expected_chars = sum(opts.expected_arguments[name].ByteSize() for name in opts.expected_arguments)
        self.fixed_ns = NS_PER_CHAR_JSON * expected_chars
        self.per_char_ns = NS_PER_CHAR_JSON * (1 + len(self._arguments))

    def cost_ns(self, item: item_pb2.Item, chars: int) -> float:
        """As `_Base`, plus the item's own expected names when the grader has none (200,000 of them took
        73 ms, estimated at nothing)."""
        own = 0 if self._expected is not None else len(item.expected_tool_calls)
        return super().cost_ns(item, chars) + NS_PER_EXPECTED_NAME * own

    def _with_argument_names(self, names: Iterable[str]) -> tuple[str, ...]:
        """Expected names plus the tools given expected arguments: checking a tool's arguments implies expecting it."""
        return tuple(dict.fromkeys([*names, *self._arguments]))

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        expected = self._expected
        if expected is None:
            expected = self._with_argument_names(item.expected_tool_calls)
            if not expected:
                return _error(
                    "no expected tool calls to check against",
                    "no expected tool calls: tool_calls.expected and the item's expected_tool_calls are both empty",
                )
            expected_set: frozenset[str] | set[str] = set(expected)
        else:
            expected_set = self._expected_set
        calls = output.tool_calls
        called = {call.name for call in calls}
        missing = [name for name in expected if name not in called]
        additional = [name for name in dict.fromkeys(call.name for call in calls) if name not in expected_set]
        bad_arguments = [name for name, args in self._arguments.items() if not self._arguments_match(name, args, calls)]

        checks = len(expected) + len(self._arguments)
        failures = len(missing) + len(bad_arguments)
        if additional and not self._allow_additional:
            # Unexpected calls count as one failed check, so a failing grade never scores 1.0.
            checks += 1
            failures += 1
        score = (checks - failures) / checks
        if failures == 0:
            text = f"called every expected tool ({len(expected)})"
            if additional:
                text += f"; additional calls allowed: {_names(additional)}"
            return Grade(PASSED, 1.0, 1.0, text)
        problems: list[str] = []
        if missing:
            problems.append(f"missing calls to {_names(missing)}")
        if additional and not self._allow_additional:
            problems.append(f"additional calls to {_names(additional)}")
        if bad_arguments:
            problems.append(f"no call with the expected arguments to {_names(bad_arguments)}")
        return Grade(FAILED, score, score, "; ".join(problems))

    @staticmethod
    def _arguments_match(name: str, expected: dict[str, Any], calls: Iterable[item_pb2.ToolCall]) -> bool:
        """True when some call of `name` has every expected key with an equal value (extra keys are fine)."""
        for call in calls:
            if call.name != name:
                continue
            actual = struct_values(call.arguments)
            if actual is None:
                continue
            if all(key in actual and _json_diff(value, actual[key], False) is None for key, value in expected.items()):
                return True
        return False


_NO_LATENCY = _error(
    "the output has no latency to grade",
    "no latency: the output has no latency_ms (a recorded response without it reports none, and an echo "
    "target measures none)",
)


class _Latency(_Base):
    __slots__ = ("_max", "_max_text")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        self._max = spec.latency.max_ms
        self._max_text = _number(self._max, 1)

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        latency = output.latency_ms
        if latency <= 0:
            # 0 is proto3's "unset": a recorded response without latency_ms, or an echo. A measured call
            # always takes some time (a cached output keeps what was measured), so passing it as "0 ms"
            # graded a number nobody measured; the aggregate leaves such outputs out too.
            return _NO_LATENCY
        if latency <= self._max:
            return Grade(PASSED, 1.0, latency, f"latency {_number(latency, 1)} ms <= {self._max_text} ms")
        return Grade(FAILED, 0.0, latency, f"latency {_number(latency, 1)} ms > {self._max_text} ms")


class _Cost(_Base):
    __slots__ = ("_max", "_max_text")

    def __init__(self, spec: grader_pb2.Grader) -> None:
        super().__init__(spec)
        self._max = spec.cost.max_usd
        self._max_text = _number(self._max, 6)

    def _grade(self, item: item_pb2.Item, output: item_pb2.Response) -> Grade:
        cost = output.cost_usd
        if cost <= self._max:
            return Grade(PASSED, 1.0, cost, f"cost ${_number(cost, 6)} <= ${self._max_text}")
        return Grade(FAILED, 0.0, cost, f"cost ${_number(cost, 6)} > ${self._max_text}")


_KINDS: dict[str, type[_Base]] = {
    "exact_match": _ExactMatch,
    "contains": _Contains,
    "regex": _Regex,
    "json_match": _JsonMatch,
    "similarity": _Similarity,
    "tool_calls": _ToolCalls,
    "latency": _Latency,
    "cost": _Cost,
}


# ------------------------------------------------------------------------------------------ public API


def grader_name(spec: grader_pb2.Grader) -> str:
    """The name results use: the spec's name, else its kind (`exact_match`), so simple runs need no names."""
    return spec.name or spec.WhichOneof("kind") or "grader"


def compile_grader(spec: grader_pb2.Grader) -> CompiledGrader:
    """Build the grader for a validated spec, doing all per-run work (regex compilation...) once."""
    kind = spec.WhichOneof("kind")
    if kind is None:
        raise ValueError("grader kind is not set")
    return _KINDS[kind](spec)


def _valid_regex(pattern: str) -> str | None:
    """The compile error of a pattern, or None when RE2 can run it."""
    try:
        _compile_pattern(pattern)
    except ValueError as exc:
        return str(exc)
    return None


def validate_builtin(spec: grader_pb2.Grader, path: str) -> list[FieldViolation]:
    """Every static problem of a spec but a judge's own (evalsvc.graders.validation adds those), with
    field paths under `path` (e.g. `graders[2]`).

    Checked at CreateRun so a run never starts with a grader that cannot work for any item; what
    depends on the item (a per-item pattern, expected JSON) can only be reported per result.
    """
    out: list[FieldViolation] = []
    if len(spec.name) > MAX_GRADER_NAME:
        out.append(FieldViolation(f"{path}.name", f"must be at most {MAX_GRADER_NAME} characters"))
    if not math.isfinite(spec.weight) or spec.weight < 0:
        out.append(FieldViolation(f"{path}.weight", "must be a finite number >= 0 (0 means 1)"))
    kind = spec.WhichOneof("kind")
    if kind is None:
        out.append(FieldViolation(path, one_of(spec, "kind")))
    elif kind == "contains":
        if not spec.contains.values:
            out.append(FieldViolation(f"{path}.contains.values", "at least one value is required"))
        for i, value in enumerate(spec.contains.values):
            if not value:
                out.append(FieldViolation(f"{path}.contains.values[{i}]", "must not be empty"))
    elif kind == "regex":
        if spec.regex.pattern:
            problem = _valid_regex(spec.regex.pattern)
            if problem is not None:
                out.append(FieldViolation(f"{path}.regex.pattern", f"invalid regular expression: {problem}"))
    elif kind == "similarity":
        threshold = spec.similarity.threshold
        if not 0 <= threshold <= 1:  # also rejects NaN
            out.append(FieldViolation(f"{path}.similarity.threshold", "must be between 0 and 1 (0 means 0.8)"))
    elif kind == "tool_calls":
        opts = spec.tool_calls
        for i, name in enumerate(opts.expected):
            if not name:
                out.append(FieldViolation(f"{path}.tool_calls.expected[{i}]", "must not be empty"))
        for name in sorted(opts.expected_arguments):
            if not name:
                out.append(FieldViolation(f"{path}.tool_calls.expected_arguments", "tool names must not be empty"))
            elif struct_values(opts.expected_arguments[name]) is None:
                out.append(
                    FieldViolation(
                        f"{path}.tool_calls.expected_arguments[{json.dumps(name)}]",
                        NOT_JSON_VALUES,
                    )
                )
    elif kind == "latency":
        if not (math.isfinite(spec.latency.max_ms) and spec.latency.max_ms > 0):
            out.append(FieldViolation(f"{path}.latency.max_ms", "must be a finite number > 0"))
    elif kind == "cost" and not (math.isfinite(spec.cost.max_usd) and spec.cost.max_usd >= 0):
        out.append(FieldViolation(f"{path}.cost.max_usd", "must be a finite number >= 0"))
    elif kind == "saved":
        if not spec.saved.grader_id:
            out.append(FieldViolation(f"{path}.saved.grader_id", "the saved grader's id is required"))
        if spec.saved.version < 0:
            out.append(FieldViolation(f"{path}.saved.version", "must be >= 0 (0 means the latest)"))
    return out
