"""docs/spec.md against the protos, and the spec checker behind `evalctl validate` (no server, no network).

A field added to any message a spec can set fails here until docs/spec.md documents it; every example in the doc
is checked by the same code `evalctl validate` runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.descriptor import Descriptor, EnumDescriptor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))

from evalsvc_client import pb  # noqa: E402
from evalsvc_client.spec import DATASET_KEY, MAX_ROW_PROBLEMS, SpecError, check_spec, enum_choices, load_spec  # noqa: E402

DOC = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
HEADING = re.compile(r"^#+ .*\(`([\w.]+)`\)\s*$")
FREE_FORM = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
BASE_SPEC = {"target": "provided", "graders": [{"exact_match": {}}], "items": [{"input": "x", "response": "x"}]}


def sections() -> dict[str, str]:
    """The doc's sections by the message or enum name in their heading: `## Targets (`Target`)` -> Target."""
    found: dict[str, str] = {}
    name = ""
    for line in DOC.splitlines():
        match = HEADING.match(line)
        if match:
            name = match[1]
            found[name] = ""
        elif line.startswith("#"):
            name = ""
        elif name:
            found[name] += line + "\n"
    return found


def table_keys(text: str) -> list[str]:
    return re.findall(r"^\| `([\w]+)` \|", text, re.MULTILINE)


def reachable(descriptor: Descriptor, seen: dict[str, Descriptor]) -> dict[str, Descriptor]:
    """Every message a spec can set, from CreateRunRequest down (free-form JSON messages left out)."""
    seen[descriptor.full_name] = descriptor
    for field in descriptor.fields:
        message = field.message_type
        if message is None or message.full_name in FREE_FORM or message.full_name in seen:
            continue
        if message.GetOptions().map_entry:
            continue  # map<string, string|Struct>: documented as the map field itself
        reachable(message, seen)
    return seen


def enums_of(messages: dict[str, Descriptor]) -> dict[str, EnumDescriptor]:
    return {f.enum_type.full_name: f.enum_type for m in messages.values() for f in m.fields if f.enum_type is not None}


def doc_name(full_name: str) -> str:
    return full_name.removeprefix("evalsvc.v1.")


MESSAGES = reachable(pb.runs.CreateRunRequest.DESCRIPTOR, {})
ENUMS = enums_of(MESSAGES)


def test_every_field_of_every_spec_message_is_documented_and_nothing_else() -> None:
    documented = sections()
    for full_name, descriptor in MESSAGES.items():
        name = doc_name(full_name)
        assert name in documented, f"docs/spec.md has no section headed (`{name}`)"
        expected = {f.name for f in descriptor.fields} | ({DATASET_KEY} if name == "CreateRunRequest" else set())
        keys = table_keys(documented[name])
        assert set(keys) == expected, (
            f"docs/spec.md ({name}): missing {sorted(expected - set(keys))}, stale {sorted(set(keys) - expected)}"
        )
        assert "```yaml" in documented[name], f"docs/spec.md ({name}) has no example"


def test_every_enum_value_is_documented() -> None:
    documented = sections()
    for full_name, enum in ENUMS.items():
        name = doc_name(full_name)
        assert name in documented, f"docs/spec.md has no section headed (`{name}`)"
        assert set(table_keys(documented[name])) == set(enum_choices(enum)), f"docs/spec.md ({name})"


def _examples() -> list[tuple[str, Any]]:
    found = []
    for name, text in sections().items():
        for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL):
            found.append((name, yaml.safe_load(block)))
    return found


@pytest.mark.parametrize(("section", "example"), _examples(), ids=[name for name, _ in _examples()])
def test_every_example_in_the_doc_is_a_valid_spec(section: str, example: Any) -> None:
    data = {**BASE_SPEC, **example}
    if "dataset" in example or "dataset_id" in example:
        data.pop("items")
    spec, problems = check_spec(data, ROOT / "examples")
    assert spec is not None, f"docs/spec.md ({section}): {[str(p) for p in problems]}"


def _problems(data: dict[str, Any]) -> dict[str, str]:
    spec, problems = check_spec(data, ROOT / "examples")
    assert spec is None
    return {p.path: p.message for p in problems}


def test_problems_name_the_snake_case_path_the_closest_name_and_the_valid_values() -> None:
    problems = _problems(
        {
            "target": "provded",
            "graders": [
                {"name": "e", "exact_mach": {}},
                {"name": "j", "llm_judge": {"mode": "acuracy", "scoring": "NUMERIC", "threshold": "high"}},
                {"name": "c", "contains": {"values": "Paris"}, "regex": {}},
            ],
            "pass_treshold": 80,
            "items": [{"input": "x", "expectedOuput": "y"}],
        }
    )
    assert problems["graders[0].exact_mach"].startswith("unknown key; did you mean 'exact_match'?")
    assert problems["graders[1].llm_judge.mode"] == (
        "'acuracy' is not a valid value; did you mean 'accuracy'?; use one of accuracy, criteria, levels, policy"
    )
    assert "graders[1].llm_judge.scoring" not in problems  # NUMERIC is SCORING_NUMERIC, short and in any case
    assert problems["graders[1].llm_judge.threshold"] == "expected a whole number, got 'high'"
    assert problems["graders[2].contains.values"] == "expected a list, got 'Paris'"
    assert problems["graders[2]"] == "set only one of contains, regex (they are alternatives)"
    assert problems["pass_treshold"].startswith("unknown key; did you mean 'pass_threshold'?")
    assert problems["items[0].expectedOuput"].startswith("unknown key; did you mean 'expected_output'?")
    target = problems["target"]
    assert "did you mean 'provided'?" in target and all(k in target for k in ("echo", "chat", "http"))


def test_dataset_rows_are_checked_with_their_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"input": "a", "response": "a"}\n{"input": "b", "respons": "b"}\n')
    spec, found = check_spec(
        {"dataset": "rows.jsonl", "target": "provided", "graders": [{"exact_match": None}]}, tmp_path
    )
    assert spec is None and [str(p) for p in found] == [
        "rows.jsonl:2: respons: unknown key; did you mean 'response'? (Item keys: id, input, expected_output,"
        " context, conversation, expected_tool_calls, response, metadata, human_verdicts)"
    ]


def test_short_forms_expand_to_the_request_the_server_gets() -> None:
    spec, problems = check_spec(
        {
            "target": {"chat": {"endpoint": {"baseUrl": "http://127.0.0.1:1/v1"}, "model": "m", "temperature": 0}},
            "graders": [{"llm_judge": {"mode": "Policy", "criteria": "no insults"}}, {"exact_match": None}],
            "items": [{"input": "x", "expected_output": 42, "response": "42"}],
            "trigger": "backfill",
        },
        ROOT,
    )
    assert spec is not None, problems
    request = spec.request()
    assert request.graders[0].llm_judge.mode == pb.grader.LlmJudge.MODE_POLICY
    assert request.graders[1].HasField("exact_match")
    assert request.items[0].expected_output == "42" and request.items[0].response.content == "42"
    assert request.target.chat.HasField("temperature") and request.trigger == pb.run.TRIGGER_BACKFILL
    assert request.request_id  # a fresh idempotency key per spec load


def test_the_sdk_checks_mappings_as_specs_are() -> None:
    from evalsvc_client._common import to_grader, to_item, to_target

    with pytest.raises(ValueError, match=r"grader: exact_mach: unknown key; did you mean 'exact_match'\?"):
        to_grader({"name": "e", "exact_mach": {}})
    with pytest.raises(ValueError, match=r"target: chat.modle: unknown key; did you mean 'model'\?"):
        to_target({"chat": {"modle": "m"}})
    assert to_grader({"llm_judge": {"mode": "accuracy"}}).llm_judge.mode == pb.grader.LlmJudge.MODE_ACCURACY
    assert to_grader({"llmJudge": {"mode": 2}}).llm_judge.mode == pb.grader.LlmJudge.MODE_CRITERIA
    assert to_item({"input": "x", "response": {"promptTokens": "12"}}).response.prompt_tokens == 12


def _write_spec(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _load_problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    return [str(p) for p in refused.value.problems]


def test_numbers_a_field_cannot_hold_are_problems_with_their_paths_not_tracebacks(tmp_path: Path) -> None:
    """json_format refused these with a ParseError traceback (evalctl exited 1, not 3)."""
    spec = _write_spec(
        tmp_path,
        "items: [{input: a, response: {content: a, prompt_tokens: 99999999999999999999999, latency_ms: 1e400}}]\n"
        "target: provided\n"
        "graders: [{name: l, latency: {max_ms: .inf}}]\n"
        "repetitions: 3000000000\n"
        "pass_threshold: .nan\n"
        f"max_cost_usd: {10**400}\n",
    )
    assert _load_problems(spec) == [
        "items[0].response.prompt_tokens: expected a whole number from -9223372036854775808 to"
        " 9223372036854775807, got 99999999999999999999999",
        "items[0].response.latency_ms: expected a finite number, got '1e400'",
        "graders[0].latency.max_ms: expected a finite number, got inf",
        "repetitions: expected a whole number from -2147483648 to 2147483647, got 3000000000",
        "pass_threshold: expected a finite number, got nan",
        f"max_cost_usd: expected a finite number, got {str(10**400)[:57]}...",  # shown shortened
    ]


def test_free_form_json_that_json_cannot_hold_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    spec = _write_spec(
        tmp_path,
        "items: [{input: a, response: {content: a, tool_calls: [{name: f, arguments: {when: 2024-01-01}}]}}]\n"
        "target: provided\ngraders: [{exact_match: {}}]\n",
    )
    [problem] = _load_problems(spec)
    assert "Value 2024-01-01 has unexpected type" in problem and "items[0].response.tool_calls[0]" in problem


def test_files_that_are_not_utf8_name_the_file_and_line(tmp_path: Path) -> None:
    assert _load_problems(_write_spec(tmp_path, b"\xff\xfe garbage")) == [
        "spec.yaml:1: not UTF-8 (byte 0xff: invalid start byte); save the file as UTF-8"
    ]
    (tmp_path / "latin.csv").write_bytes("id,input\nr1,caf\xe9\n".encode("latin-1"))
    spec = _write_spec(tmp_path, "dataset: latin.csv\ntarget: provided\ngraders: [{exact_match: {}}]\n")
    assert _load_problems(spec) == [
        "latin.csv:2: not UTF-8 (byte 0xe9: invalid continuation byte); save the file as UTF-8"
    ]


def test_a_utf8_byte_order_mark_is_not_part_of_the_data(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the `id` column became metadata "\\ufeffid"."""
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfid,input,response\nr1,a,a\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "j1", "input": "a", "response": "a"}\n')
    for dataset, item_id in (("bom.csv", "r1"), ("bom.jsonl", "j1")):
        spec = _write_spec(tmp_path, f"\ufeffdataset: {dataset}\ntarget: provided\ngraders: [{{exact_match: {{}}}}]\n")
        [item] = load_spec(spec).request().items
        assert item.id == item_id and dict(item.metadata) == {}


def test_yaml_on_off_yes_and_no_stay_text(tmp_path: Path) -> None:
    """YAML 1.1 reads them as booleans: the documented `cache_mode: off` was refused as "False is not a valid
    value", and a dataset's `expected_output: no` as not text. Only true and false are booleans."""
    (tmp_path / "rows.yaml").write_text("- {input: Raining, expected_output: no, response: yes}\n")
    spec = _write_spec(
        tmp_path,
        "dataset: rows.yaml\ntarget: provided\ngraders: [{exact_match: {case_insensitive: true}}]\ncache_mode: off\n",
    )
    request = load_spec(spec).request()
    assert request.cache_mode == pb.cache.CACHE_MODE_OFF and request.graders[0].exact_match.case_insensitive
    assert request.items[0].expected_output == "no" and request.items[0].response.content == "yes"
    on = _write_spec(tmp_path, "items: [{input: a}]\ntarget: provided\ngraders: [{exact_match: {}}]\ntrigger: on\n")
    assert _load_problems(on) == ["trigger: 'on' is not a valid value; use one of manual, auto, backfill"]


def test_an_empty_dataset_is_a_problem(tmp_path: Path) -> None:
    """validate passed it, and CreateRun then refused the run for having no items."""
    (tmp_path / "empty.jsonl").write_text("\n")
    spec = _write_spec(tmp_path, "dataset: empty.jsonl\ntarget: provided\ngraders: [{exact_match: {}}]\n")
    assert _load_problems(spec) == ["empty.jsonl: the dataset has no rows; a run needs at least one item"]


def test_a_nul_is_named_with_every_other_problem(tmp_path: Path) -> None:
    """The server refuses a NUL before checking anything else, so a run named only it."""
    spec = _write_spec(
        tmp_path,
        'items: [{input: a}, {input: "b\\0c", metadata: {"k\\0": v}}]\ntarget: provded\ngraders: [{exact_mach: {}}]\n',
    )
    problems = _load_problems(spec)
    assert "items[1].input: contains a NUL (U+0000) character, which the server refuses" in problems
    assert "items[1].metadata.k\x00: the key contains a NUL (U+0000) character, which the server refuses" in problems
    assert any(p.startswith("graders[0].exact_mach: unknown key") for p in problems)
    assert any(p.startswith("target: ") for p in problems)


def test_every_bad_dataset_row_is_named_once_and_at_most_a_bounded_number(tmp_path: Path) -> None:
    """A line that was not JSON hid every other row's problems; a problem with a whole row read `bad.jsonl:4: :`."""
    (tmp_path / "bad.jsonl").write_text(
        '{"input": "a", "response": "a"}\nnot json\n{"input": "b", "expected_ouput": "b"}\n[1, 2]\n'
    )
    spec = _write_spec(tmp_path, "dataset: bad.jsonl\ntarget: provided\ngraders: [{exact_match: {}}]\n")
    problems = _load_problems(spec)
    assert problems[0] == "bad.jsonl:2: not valid JSON: Expecting value: line 1 column 1 (char 0)"
    assert problems[1].startswith("bad.jsonl:3: expected_ouput: unknown key; did you mean 'expected_output'?")
    assert problems[2:] == ["bad.jsonl:4: expected a mapping (Item), got a list"]

    (tmp_path / "bad.jsonl").write_text("".join(f"row {n}\n" for n in range(MAX_ROW_PROBLEMS + 5)))
    problems = _load_problems(spec)
    assert len(problems) == MAX_ROW_PROBLEMS + 1 and problems[-1] == "bad.jsonl: ... and 5 more problems in its rows"


def test_an_empty_spec_or_a_directory_says_so(tmp_path: Path) -> None:
    assert _load_problems(_write_spec(tmp_path, "# nothing yet\n")) == [
        "the file is empty: a spec names at least a target and graders"
    ]
    assert _load_problems(tmp_path) == ["a directory, not a spec file (examples/spec.yaml is one that runs)"]
    spec = _write_spec(tmp_path, "dataset: .\ntarget: provided\ngraders: [{exact_match: {}}]\n")
    assert _load_problems(spec) == [f"dataset: a directory, not a dataset file: {tmp_path}"]


def test_describe_counts_in_words() -> None:
    spec, problems = check_spec(BASE_SPEC, ROOT)
    assert spec is not None, problems
    assert spec.describe() == "1 item, target provided, 1 grader (exact_match), 1 repetition"
