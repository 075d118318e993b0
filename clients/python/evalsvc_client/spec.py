"""Run specs for `evalctl run` and `evalctl validate`: a YAML (or JSON) file naming a dataset file, a target and
graders. docs/spec.md lists every key; examples/ has specs that run as they are.

    display_name: nightly qa
    dataset: qa.jsonl            # .jsonl, .csv, .yaml/.yml or .json, relative to the spec; or dataset_id: ds_...
    target: provided             # or echo, or a Target: {chat: {endpoint: {base_url: ...}, model: ...}}
    graders:
      - {name: exact, exact_match: {normalize_whitespace: true}}
      - {name: judge, llm_judge: {mode: accuracy}}
    pass_threshold: 90           # percent of graded evaluations; unset means every one must pass
    max_error_rate: 2            # percent of evaluations that may error; unset means none may

The keys are CreateRunRequest's fields in snake_case (camelCase is accepted too), plus `dataset`. Enum values may
be written short (`mode: accuracy` for MODE_ACCURACY). A spec is checked whole before anything is sent: every
problem is reported with its path (`graders[0].exact_mach`), the closest valid name, and the valid values.

Dataset rows are Items (`id`, `input`, `expected_output`, `context`, `conversation`, `expected_tool_calls`,
`response`, `metadata`); `response` may be a plain string (the recorded output). In CSV, columns `id`, `input`,
`expected_output`, `context` and `response` fill those fields, `expected_tool_calls` is split on `;`, and any
other column becomes metadata.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from evalsvc_client import pb
from evalsvc_client._common import new_request_id, to_target

M = TypeVar("M", bound=Message)
_ITEM_FIELDS = {"id", "input", "expected_output", "context", "response"}
#: Spec keys that are not CreateRunRequest fields.
DATASET_KEY = "dataset"
#: Messages written as free-form JSON (tool parameters, expected arguments): not checked key by key.
_FREE_FORM = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
#: The integer types, with the values each holds (json_format refuses the rest with a traceback).
_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
#: The server refuses text holding NUL (PostgreSQL cannot store it); said here too, with the rest.
_NUL_PROBLEM = "contains a NUL (U+0000) character, which the server refuses"
#: Dataset problems shown at most: a file of the wrong format would otherwise list every one of its lines.
MAX_ROW_PROBLEMS = 20
#: CreateRunRequest's percent fields (0-100), which other tools write as fractions (0.9 for 90%).
PERCENT_FIELDS = ("pass_threshold", "max_error_rate")
#: A label key, as the server's rule is (evalsvc.messages.validation.LABEL_KEY, which this client cannot import;
#: tests/test_client_cli.py holds the two equal): `validate` passed `labels: {Suite: agent}`, which `run` was refused.
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: The server's other label bounds (validation.MAX_LABELS, MAX_LABEL_VALUE; held equal by the same test): a
#: spec of 65 labels, or a value of 64 characters, was `valid` and refused by `run`.
MAX_LABELS = 64
MAX_LABEL_VALUE = 63
#: The judge modes that grade against `criteria` (the policy, in policy mode), which the server requires.
_CRITERIA_MODES = (pb.grader.LlmJudge.MODE_CRITERIA, pb.grader.LlmJudge.MODE_POLICY)


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong in a spec: where (`graders[0].exact_mach`) and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A spec or dataset file that cannot be used; `problems` lists each one with its path."""

    def __init__(self, source: str, problems: list[SpecProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = [str(p) for p in problems]
        if len(lines) == 1:
            super().__init__(f"{source}: {lines[0]}")
        else:
            super().__init__(f"{source}: {len(lines)} problems\n" + "\n".join(f"  {line}" for line in lines))


def closest(name: str, valid: list[str]) -> str:
    """`; did you mean 'x'?` for the valid name nearest to a mistyped one, or nothing when none is near."""
    found = difflib.get_close_matches(name, valid, n=1, cutoff=0.6) or difflib.get_close_matches(
        name.lower(), [v.lower() for v in valid], n=1, cutoff=0.6
    )
    return f"; did you mean '{found[0]}'?" if found else ""


def plural(count: int, noun: str) -> str:
    """`1 grader`, `2 graders`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path and not path.endswith(": ") else f"{path}{key}"


def enum_choices(enum: EnumDescriptor) -> dict[str, str]:
    """Short names (`accuracy`) of an enum's values, to their full names (MODE_ACCURACY); UNSPECIFIED left out."""
    names = [value.name for value in enum.values if value.number != 0]
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED") if 0 in enum.values_by_number else ""
    return {name.removeprefix(prefix).lower(): name for name in names}


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return "a mapping"
    if field.enum_type is not None:
        return "one of " + ", ".join(enum_choices(field.enum_type))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true or false"
    if field.type in _INTEGER_RANGES:
        return "a whole number"
    if field.type in _FLOAT_TYPES:
        return "a number"
    return "a string"


#: Short forms: (message, field) -> how a plain value is written out.
_SHORTHANDS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("evalsvc.v1.Item", "response"): lambda value: {"content": value} if isinstance(value, str) else value,
}


class _Checker:
    """Walks spec data against the proto messages, collecting every problem and returning the data with short
    forms expanded (enum short names, `response: text`), ready for json_format."""

    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []

    def problem(self, path: str, message: str) -> None:
        # A dataset row's own path is a prefix ending ": " (`qa.jsonl:4: `, joined to `qa.jsonl:4: input`);
        # a problem with the whole row is at `qa.jsonl:4`.
        self.problems.append(SpecProblem(path.removesuffix(": "), message))

    def message(self, data: Any, descriptor: Descriptor, path: str) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            self.problem(path, f"expected a mapping ({descriptor.name}), got {_shown(data)}")
            return {}
        by_name = {f.name: f for f in descriptor.fields} | {f.json_name: f for f in descriptor.fields}
        valid = [f.name for f in descriptor.fields]
        out: dict[str, Any] = {}
        for key, value in data.items():
            field = by_name.get(str(key))
            if field is None:
                self.problem(
                    _join(path, str(key)),
                    f"unknown key{closest(str(key), valid)} ({descriptor.name} keys: {', '.join(valid)})",
                )
                continue
            shorthand = _SHORTHANDS.get((descriptor.full_name, field.name))
            out[field.name] = self.field(field, shorthand(value) if shorthand else value, _join(path, field.name))
        for oneof in descriptor.oneofs:
            if len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}":
                continue  # the synthetic oneof of an `optional` field
            chosen = [f.name for f in oneof.fields if f.name in out]
            if len(chosen) > 1:
                self.problem(path or descriptor.name, f"set only one of {', '.join(chosen)} (they are alternatives)")
        return out

    def field(self, field: FieldDescriptor, value: Any, path: str) -> Any:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if not isinstance(value, Mapping):
                self.problem(path, f"expected a mapping of keys to values, got {_shown(value)}")
                return {}
            value_field = entry.fields_by_name["value"]
            for key in value:
                if "\x00" in str(key):
                    self.problem(_join(path, str(key)), f"the key {_NUL_PROBLEM}")
            return {str(k): self.value(value_field, v, _join(path, str(k))) for k, v in value.items()}
        if field.is_repeated:
            if not isinstance(value, list):
                self.problem(path, f"expected a list, got {_shown(value)}")
                return []
            return [self.value(field, v, _join(path, i)) for i, v in enumerate(value)]
        return self.value(field, value, path)

    def value(self, field: FieldDescriptor, value: Any, path: str) -> Any:
        if field.message_type is not None:
            if field.message_type.full_name in _FREE_FORM:
                return value
            # `exact_match:` with nothing after it (YAML's null) means the message with its defaults.
            return self.message({} if value is None else value, field.message_type, path)
        if field.enum_type is not None:
            return self.enum(field.enum_type, value, path)
        value, expected = _scalar(field, value)
        if expected:
            self.problem(path, f"expected {expected}, got {_shown(value)}")
        elif isinstance(value, str) and "\x00" in value:
            self.problem(path, _NUL_PROBLEM)
        return value

    def enum(self, enum: EnumDescriptor, value: Any, path: str) -> Any:
        choices = enum_choices(enum)
        if isinstance(value, int) and not isinstance(value, bool) and value in enum.values_by_number:
            return value  # a number, as proto3 JSON allows
        text = str(value) if isinstance(value, str) else ""
        if text in choices.values():
            return text
        if text.lower() in choices:
            return choices[text.lower()]
        self.problem(
            path, f"{_shown(value)} is not a valid value{closest(text, list(choices))}; use one of {', '.join(choices)}"
        )
        return value


def _scalar(field: FieldDescriptor, value: Any) -> tuple[Any, str]:
    """A scalar field's value as json_format takes it, and what was expected instead ("" when it is fine).
    Numbers are checked against what the field's type holds (an int32, a finite double): json_format refused
    `repetitions: 3000000000` or `max_ms: .inf` with a traceback. Ranges that mean something (repetitions
    1-100) are the server's to check."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        return value, "" if isinstance(value, bool) else _type_name(field)
    if field.type in _INTEGER_RANGES:
        whole = _whole(value)
        if whole is None:
            return value, _type_name(field)
        low, high = _INTEGER_RANGES[field.type]
        # proto3 JSON writes 64-bit integers as strings: the int is what json_format takes.
        return whole, "" if low <= whole <= high else f"a whole number from {low} to {high}"
    if field.type in _FLOAT_TYPES:
        real = _real(value)
        if real is None:
            return value, _type_name(field)
        return value, "" if math.isfinite(real) else "a finite number"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value), ""  # YAML reads `expected_output: 4` as a number
    return value, "" if isinstance(value, str) else _type_name(field)


def _whole(value: Any) -> int | None:
    """A whole number written as an int, an integral float (`1e3` in JSON) or text (`"12"`); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _real(value: Any) -> float | None:
    """A number written as a number or as text (`"1e-3"`, `Infinity`), as a float (an int too large for one is
    infinite); None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _descriptor(message: type[Message]) -> Descriptor:
    """A message class's descriptor: the stubs type it as that of either protobuf implementation (pure Python or
    upb), which have the same interface."""
    return cast(Descriptor, message.DESCRIPTOR)


def parse_message(data: Mapping[str, Any], message: type[M], what: str) -> M:
    """A message from proto-JSON-like data, checked as specs are (snake_case or camelCase keys, short enum names,
    `response` as text): a SpecError (a ValueError) names every problem with its path and the closest name."""
    checker = _Checker()
    checked = checker.message(data, _descriptor(message), "")
    if checker.problems:
        raise SpecError(what, checker.problems)
    return _parse_checked(checked, message, what)


def _parse_checked(data: dict[str, Any], message: type[M], what: str) -> M:
    """The message of data the checker passed. What it does not look into, free-form JSON (tool arguments,
    parameters), can still hold what JSON cannot (a YAML date): a SpecError too, never json_format's traceback."""
    try:
        return json_format.ParseDict(data, message())
    except json_format.ParseError as exc:
        raise SpecError(what, [SpecProblem("", str(exc))]) from None


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = repr(value)
    return shown if len(shown) <= 60 else f"{shown[:57]}..."


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true and false. YAML 1.1 also reads on, off, yes and
    no as booleans, so the documented `cache_mode: off` arrived as False (not a valid value) and a dataset's
    `expected_output: no` as a boolean; here they stay the text they are."""


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read_text(path: Path) -> str:
    """A spec or dataset file's text: UTF-8, with or without the byte order mark that Excel's "CSV UTF-8" and
    Windows editors write (in a CSV header it became part of the first column's name)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"not UTF-8 (byte 0x{data[exc.start]:02x}: {exc.reason}); save the file as UTF-8"
        raise SpecError(str(path), [SpecProblem(f"{path.name}:{line}", problem)]) from None


def _load_structured(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_SpecLoader)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(
            str(path), [SpecProblem(path.name, f"not valid {path.suffix.lstrip('.').upper()}: {exc}")]
        ) from exc


def _csv_row(row: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {k: v for k, v in row.items() if k in _ITEM_FIELDS and v not in (None, "")}
    if row.get("expected_tool_calls"):
        data["expected_tool_calls"] = [t.strip() for t in row["expected_tool_calls"].split(";") if t.strip()]
    metadata = {k: v for k, v in row.items() if k not in _ITEM_FIELDS | {"expected_tool_calls"} and k and v}
    if metadata:
        data["metadata"] = metadata
    return data


@dataclass(frozen=True)
class _UnreadableRow:
    """A dataset line that is not JSON, reported in its place among the other rows' problems."""

    problem: str


def _dataset_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) of every row of a .jsonl, .csv, .yaml/.yml or .json dataset file (an _UnreadableRow for a
    line that is not JSON); a SpecError says what keeps the file from being read at all."""
    name = path.name
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: list[tuple[str, Any]] = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{name}:{number}: ", json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((f"{name}:{number}: ", _UnreadableRow(f"not valid JSON: {exc}")))
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        columns = reader.fieldnames
        if columns is None:
            return []  # an empty file: no rows
        if "input" not in columns:
            found = ", ".join(repr(column) for column in columns)
            problem = f"no 'input' column; its first line names the columns {found}"
            raise SpecError(str(path), [SpecProblem(f"{name}:1", problem)])
        return [(f"{name}:{n}: ", _csv_row(row)) for n, row in enumerate(reader, start=2)]
    if suffix in (".yaml", ".yml", ".json"):
        data = _load_structured(path)
        listed = data.get("items") if isinstance(data, Mapping) else data
        if listed is None:
            return []  # an empty file (or `items:` with none): no rows
        if not isinstance(listed, list):
            raise SpecError(str(path), [SpecProblem(name, "expected a list of items (or a mapping with `items`)")])
        return [(f"{name} items[{n}]: ", row) for n, row in enumerate(listed)]
    raise SpecError(
        str(path), [SpecProblem(name, f"unknown dataset format {suffix!r}: use .jsonl, .csv, .yaml or .json")]
    )


def _not_a_file(path: Path, what: str) -> str | None:
    """Why path cannot be read as a spec or dataset file, or None when it is a file."""
    if path.is_dir():
        return f"a directory, not a {what} file"
    return None if path.is_file() else f"no such {what} file"


def _checked_items(checker: _Checker, path: Path) -> list[dict[str, Any]]:
    """A dataset file's rows checked as Items, their problems added to the checker's: every row's, up to
    MAX_ROW_PROBLEMS (a line that is not JSON hid the rest), and a file without rows (a run needs items)."""
    if (why := _not_a_file(path, "dataset")) is not None:
        checker.problem(DATASET_KEY, f"{why}: {path}")
        return []
    try:
        rows = _dataset_rows(path)
    except SpecError as exc:
        checker.problems.extend(exc.problems)
        return []
    if not rows:
        checker.problem(path.name, "the dataset has no rows; a run needs at least one item")
    before = len(checker.problems)
    items = []
    first_of: dict[str, str] = {}  # item id -> where it first was
    for where, row in rows:
        if isinstance(row, _UnreadableRow):
            checker.problem(where, row.problem)
            continue
        item = checker.message(row, _descriptor(pb.Item), where)
        items.append(item)
        item_id = item.get("id")
        if isinstance(item_id, str) and item_id and (first := first_of.setdefault(item_id, where)) is not where:
            taken = f"id {item_id!r} is already the item's at {first.removesuffix(': ')}; ids must be unique"
            checker.problem(where, taken)
    if (more := len(checker.problems) - before - MAX_ROW_PROBLEMS) > 0:
        del checker.problems[before + MAX_ROW_PROBLEMS :]
        checker.problem(path.name, f"... and {plural(more, 'more problem')} in its rows")
    return items


def load_items(path: Path) -> list[pb.Item]:
    """Items from a .jsonl, .csv, .yaml/.yml or .json dataset file, checked as a spec's dataset is."""
    checker = _Checker()
    rows = _checked_items(checker, path)
    if checker.problems:
        raise SpecError(str(path), checker.problems)
    return [_parse_checked(row, pb.Item, str(path)) for row in rows]


@dataclass
class RunSpec:
    """A checked spec: the CreateRunRequest it stands for (a fresh request_id unless the spec sets one)."""

    create_request: pb.runs.CreateRunRequest
    dataset_file: Path | None = None
    request_id_given: bool = False  # the spec names its request_id: a run may already exist for it

    def request(self) -> pb.runs.CreateRunRequest:
        return self.create_request

    def warnings(self) -> list[str]:
        """What the spec likely does not mean, though it is valid: a percent above 0 and at most 1 is written as
        other tools write a fraction (`pass_threshold: 0.9` for 90%), and was taken as 0.9%, a bar nearly every
        run passes, silently. Not a problem: 0.5% may be meant."""
        found = []
        for name in PERCENT_FIELDS:
            value = getattr(self.create_request, name)
            if self.create_request.HasField(name) and 0 < value <= 1:
                found.append(f"{name} {value:g} is a percent ({value:g}%); for {value * 100:g}% write {value * 100:g}")
        found.extend(self._unmatched_human_verdicts())
        return found

    def _unmatched_human_verdicts(self) -> list[str]:
        """Items' `human_verdicts` that name none of the spec's graders: the server ignores them (a
        dataset may carry verdicts for other runs' graders), so a misspelt name compares nothing. Not
        known for a saved grader's name, which the server resolves."""
        graders = self.create_request.graders
        if any(g.WhichOneof("kind") == "saved" for g in graders):
            return []
        names = {grader_name(g) for g in graders}
        unmatched = sorted({key for item in self.create_request.items for key in item.human_verdicts} - names)
        if not unmatched:
            return []
        return [
            f"human_verdicts name {', '.join(repr(n) for n in unmatched)}, which no grader here is called "
            f"(graders: {', '.join(sorted(names))}); those verdicts are compared with nothing"
        ]

    def describe(self) -> str:
        """One line for `evalctl validate`: what the spec would run."""
        request = self.create_request
        kind = request.target.WhichOneof("kind") or "none"
        source = (
            f"{plural(len(request.items), 'item')} from {self.dataset_file.name}"
            if self.dataset_file is not None
            else f"dataset {request.dataset_id}"
            if request.dataset_id
            else plural(len(request.items), "item")
        )
        repetitions = max(request.repetitions, 1)
        return (
            f"{source}, target {kind}, {plural(len(request.graders), 'grader')}"
            f" ({', '.join(g.name or g.WhichOneof('kind') or '?' for g in request.graders)}),"
            f" {plural(repetitions, 'repetition')}"
        )


# The generated stubs type an enum's items() as plain ints; they are CacheMode values.
CACHE_MODES = cast(
    "dict[str, pb.cache.CacheMode]",
    {name.removeprefix("CACHE_MODE_").lower(): value for name, value in pb.cache.CacheMode.items() if value},
)


def cache_mode(name: str, given_as: str = "--cache") -> pb.cache.CacheMode:
    """The CacheMode of `off`, `read_write`, `refresh` or `replay` (docs/targets.md). `given_as` names where
    the name came from in the SpecError: `evalctl run --cache`, or the SDK's `cache_mode` parameter (whose
    callers were told of a `--cache` flag they never used)."""
    try:
        return CACHE_MODES[name.strip().lower()]
    except KeyError:
        raise SpecError(given_as, [SpecProblem("", f"must be one of {', '.join(CACHE_MODES)}, not {name!r}")]) from None


def _target(checker: _Checker, value: Any) -> Any:
    """A target written as a kind name (`provided`, `echo`) is expanded; anything else is checked as a Target."""
    if isinstance(value, str):
        try:
            return json_format.MessageToDict(to_target(value), preserving_proto_field_name=True)
        except ValueError as exc:
            checker.problem("target", str(exc))
            return {}
    data = checker.message(value, _descriptor(pb.Target), "target")
    if isinstance(value, Mapping) and not any(
        f.name in data for f in pb.Target.DESCRIPTOR.oneofs_by_name["kind"].fields
    ):
        kinds = ", ".join(f.name for f in pb.Target.DESCRIPTOR.oneofs_by_name["kind"].fields)
        checker.problem("target", f"name the target's kind: one of {kinds}")
    return data


def check_spec(data: Any, spec_dir: Path) -> tuple[RunSpec | None, list[SpecProblem]]:
    """Check spec data whole; the RunSpec when there is no problem, and every problem otherwise."""
    checker = _Checker()
    if not isinstance(data, Mapping):
        return None, [SpecProblem("", f"expected a mapping of spec keys at the top level, got {_shown(data)}")]
    data = dict(data)
    dataset = data.pop(DATASET_KEY, None)
    target = data.pop("target", None)
    descriptor = _descriptor(pb.runs.CreateRunRequest)
    valid = [DATASET_KEY, *(f.name for f in descriptor.fields)]
    for key in list(data):
        if key not in descriptor.fields_by_name and key not in {f.json_name for f in descriptor.fields}:
            checker.problem(str(key), f"unknown key{closest(str(key), valid)} (spec keys: {', '.join(valid)})")
            data.pop(key)
    request_data = checker.message(data, descriptor, "")
    if target is None:
        checker.problem("target", "required: provided, echo, or a mapping such as {chat: {...}} (docs/spec.md)")
    else:
        request_data["target"] = _target(checker, target)
    if not request_data.get("graders"):
        checker.problem("graders", "required: a list of at least one grader, e.g. [{name: exact, exact_match: {}}]")
    for n, grader in enumerate(request_data.get("graders") or []):
        kinds = [f.name for f in pb.Grader.DESCRIPTOR.oneofs_by_name["kind"].fields]
        if isinstance(grader, Mapping) and not any(kind in grader for kind in kinds):
            checker.problem(f"graders[{n}]", f"name the grader's kind: one of {', '.join(kinds)}")
    dataset_file = None
    if dataset is not None:
        if not isinstance(dataset, str):
            checker.problem(DATASET_KEY, f"expected a file name, got {_shown(dataset)}")
        elif request_data.get("items") or request_data.get("dataset_id"):
            checker.problem(DATASET_KEY, "use one of dataset (a file), items or dataset_id")
        else:
            dataset_file = (spec_dir / dataset).resolve()
            request_data["items"] = _checked_items(checker, dataset_file)
    if checker.problems:
        return None, checker.problems
    try:
        request = _parse_checked(request_data, pb.runs.CreateRunRequest, "spec")
    except SpecError as exc:
        return None, exc.problems
    if duplicates := _duplicate_grader_names(request.graders):
        return None, duplicates
    if problems := [
        *_negative_counts(request),
        *_label_problems(request.labels),
        *_judge_problems(request.graders),
    ]:
        return None, problems
    given = bool(request.request_id)
    request.request_id = request.request_id or new_request_id()
    request.trigger = request.trigger or pb.run.TRIGGER_AUTO
    return RunSpec(request, dataset_file, given), []


#: CreateRunRequest's counts, and what unset (0) means: a negative one was taken as that (`validate` said
#: "valid: ... 1 repetition" of `repetitions: -1`).
_COUNTS = {"repetitions": "1", "warmup_runs": "none"}


def _negative_counts(request: pb.runs.CreateRunRequest) -> list[SpecProblem]:
    return [
        SpecProblem(name, f"{getattr(request, name)} is not a count: 0 or more (0 or unset: {unset})")
        for name, unset in _COUNTS.items()
        if getattr(request, name) < 0
    ]


def _label_problems(labels: Mapping[str, str]) -> list[SpecProblem]:
    """The labels the server refuses (its check_labels), as it words them: more than MAX_LABELS, keys not
    LABEL_KEY (the lower-case key suggested when it fits), values over MAX_LABEL_VALUE characters."""
    if len(labels) > MAX_LABELS:
        return [SpecProblem("labels", f"at most {MAX_LABELS} labels (got {len(labels)})")]
    problems = []
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):  # fullmatch: `match` with `$` took a key ending in a newline
            lower = f" (e.g. {key.lower()!r})" if LABEL_KEY.fullmatch(key.lower()) else ""
            problems.append(SpecProblem(f"labels[{key}]", f"key must match [a-z][a-z0-9_-]{{0,62}}{lower}"))
        if len(value) > MAX_LABEL_VALUE:
            problems.append(
                SpecProblem(f"labels[{key}]", f"must be at most {MAX_LABEL_VALUE} characters (got {len(value)})")
            )
    return problems


def _judge_problems(graders: Iterable[pb.Grader]) -> list[SpecProblem]:
    """A judge in criteria or policy mode without its criteria, which CreateRun refuses (the server's
    validate_judge): `validate` called such a spec valid."""
    return [
        SpecProblem(f"graders[{i}].llm_judge.criteria", "criteria (or the policy) is required in this mode")
        for i, grader in enumerate(graders)
        if grader.WhichOneof("kind") == "llm_judge"
        and grader.llm_judge.mode in _CRITERIA_MODES
        and not grader.llm_judge.criteria.strip()
    ]


def needs_default_judge(graders: Iterable[pb.Grader]) -> list[str]:
    """The graders (`graders[i] (name)`) that are judged by the server's default judge: judges without both a
    model and an endpoint, as the server decides (evalsvc.graders.judge.needs_default_judge). A server started
    without --judge-base-url and --judge-model refuses their run (JUDGE_NOT_CONFIGURED), which `validate`,
    without a server, cannot know."""
    return [
        f"graders[{i}] ({grader_name(grader)})"
        for i, grader in enumerate(graders)
        if grader.WhichOneof("kind") == "llm_judge"
        and not (grader.llm_judge.model and grader.llm_judge.endpoint.base_url)
    ]


def grader_name(grader: pb.Grader) -> str:
    """The name a grader's results carry, as the server gives it: its `name`, else its kind."""
    return grader.name or grader.WhichOneof("kind") or "grader"


def _duplicate_grader_names(graders: Iterable[pb.Grader]) -> list[SpecProblem]:
    """Graders after the first of a name, as CreateRun refuses them (`graders[1].name: duplicate grader
    name`): `evalctl validate` called such a spec valid, and only `run` found out."""
    problems, seen = [], set()
    for i, grader in enumerate(graders):
        name = grader_name(grader)
        if name in seen:
            problems.append(SpecProblem(f"graders[{i}].name", f"duplicate grader name {name!r}; name each grader"))
        seen.add(name)
    return problems


def load_spec(path: Path) -> RunSpec:
    """Parse and check a run spec file (dataset paths are relative to its directory); SpecError lists every
    problem."""
    if (why := _not_a_file(path, "spec")) is not None:
        raise SpecError(str(path), [SpecProblem("", f"{why} (examples/spec.yaml is one that runs)")])
    data = _load_structured(path)
    if data is None:
        raise SpecError(str(path), [SpecProblem("", "the file is empty: a spec names at least a target and graders")])
    spec, problems = check_spec(data, path.parent)
    if spec is None:
        raise SpecError(str(path), problems)
    return spec
