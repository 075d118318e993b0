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
from evalsvc_client.spec import DATASET_KEY, check_spec, enum_choices  # noqa: E402

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
        " context, conversation, expected_tool_calls, response, metadata)"
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
