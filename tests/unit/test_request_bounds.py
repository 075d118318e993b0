"""Bounds on the parts of a request that cost the event loop per part: no network, no server.

A probe's requests each held every tenant's calls for seconds: an item of 700,000 `human_verdicts`
(every later read of it parsed them again), a tool call's arguments of 400,000 fields, a ListRuns of
8,000,000 statuses, an UpdateWebhook of 1,300,000 event types, an UpdateRun of 600,000 mask paths. Each
bound is checked here on the validation function itself, at the bound (taken) and past it (refused,
naming the field); the gRPC tests (tests/test_bad_input.py, test_runs.py, test_webhooks.py) show the
RPCs refuse them with nothing written."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from evalsvc import targets
from evalsvc.errors import FieldViolation, ServiceError
from evalsvc.graders import validation as grader_validation
from evalsvc.messages.validation import (
    MAX_DEFINITION_BYTES,
    MAX_GRADER_NAME,
    MAX_GRADERS,
    MAX_MASK_KEYS,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY,
    MAX_STRUCT_VALUES,
    check_human_verdicts,
    check_items,
    check_metadata,
    check_tool_calls,
    count_struct_values,
    map_violations,
    mask_paths,
)
from evalsvc.v1 import dataset_generation_pb2, grader_pb2, item_pb2, target_pb2
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.webhooks.service import _check_event_types


def found(check, value, field: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The violations `check` appends for `value` under `field`, by field."""
    out: list[FieldViolation] = []
    check(value, field, out)
    return {v.field: v.description for v in out}


def test_metadata_is_bounded_in_entries_and_key_length() -> None:
    at_most = {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES)}
    assert found(check_metadata, at_most, "items[0].metadata") == {}
    over = {**at_most, "one-more": "v"}
    assert found(check_metadata, over, "items[0].metadata") == {
        "items[0].metadata": f"at most {MAX_METADATA_ENTRIES} entries (got {MAX_METADATA_ENTRIES + 1})"
    }
    long_key = "k" * (MAX_METADATA_KEY + 1)
    assert found(check_metadata, {"k" * MAX_METADATA_KEY: "", long_key: ""}, "m") == {
        f"m[{long_key[:MAX_METADATA_KEY]}]": f"must be at most {MAX_METADATA_KEY} characters (got {len(long_key)})"
    }


def test_human_verdicts_are_keyed_by_grader_names_at_most_a_runs_graders() -> None:
    at_most = {f"g{i}": True for i in range(MAX_GRADERS)}
    assert found(check_human_verdicts, at_most, "items[2].human_verdicts") == {}
    assert found(check_human_verdicts, {**at_most, "x": False}, "items[2].human_verdicts") == {
        "items[2].human_verdicts": f"at most {MAX_GRADERS} entries (got {MAX_GRADERS + 1})"
    }
    long_name = "g" * (MAX_GRADER_NAME + 1)
    names = {"g" * MAX_GRADER_NAME: True, long_name: True, "": False}
    assert found(check_human_verdicts, names, "v") == {
        f"v[{long_name[:MAX_GRADER_NAME]}]": f"a grader's name is 1-{MAX_GRADER_NAME} characters",
        "v[]": f"a grader's name is 1-{MAX_GRADER_NAME} characters",
    }


def nested(values: int) -> struct_pb2.Struct:
    """A Struct of `values` JSON values in all (itself included): a list inside a struct inside it."""
    struct = struct_pb2.Struct()
    inner = struct.fields["inner"].struct_value  # 2 values: the field's, and the inner Struct's own
    items = inner.fields["list"].list_value  # 1 more
    items.values.extend(struct_pb2.Value(number_value=i) for i in range(values - 3))
    return struct


def test_struct_values_are_counted_at_every_depth_and_only_until_past_the_limit() -> None:
    assert count_struct_values([nested(50)], 1000) == 50
    assert count_struct_values([nested(10), struct_pb2.Struct(), nested(10)], 1000) == 21
    assert count_struct_values([nested(50), nested(50)], 10) == 50  # stops at the container that passes it
    assert count_struct_values((struct_pb2.Struct() for _ in range(10**6)), 5) == 6  # a million empty ones


def test_tool_call_arguments_are_bounded_in_values_together() -> None:
    half = MAX_STRUCT_VALUES // 2
    response = item_pb2.Response(
        tool_calls=[
            item_pb2.ToolCall(name="a", arguments=nested(half)),
            item_pb2.ToolCall(name="b", arguments=nested(half)),
        ]
    )
    assert found(check_tool_calls, response, "items[0].response") == {}
    response.tool_calls[1].arguments.fields["one-more"].bool_value = True
    assert list(found(check_tool_calls, response, "items[0].response")) == ["items[0].response.tool_calls"]


async def test_check_items_checks_the_maps_of_every_item() -> None:
    items = [item_pb2.Item(id="a"), item_pb2.Item(id="b")]
    items[1].metadata.update({f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)})
    items[1].human_verdicts["g" * (MAX_GRADER_NAME + 1)] = True
    out: list[FieldViolation] = []
    await check_items(items, "items", out)
    assert {v.field for v in out} == {"items[1].metadata", f"items[1].human_verdicts[{'g' * MAX_GRADER_NAME}]"}


async def test_map_violations_counts_the_maps_of_any_requests_items_or_conversations() -> None:
    item = item_pb2.Item(metadata={f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)})
    item.human_verdicts.update({f"g{i}": True for i in range(MAX_GRADERS + 1)})
    request = ds.AddDatasetItemsRequest(dataset_id="d", items=[item_pb2.Item(), item])
    assert {v.field for v in await map_violations(request)} == {"items[1].metadata", "items[1].human_verdicts"}
    conversation = dataset_generation_pb2.Conversation(metadata=item.metadata)
    continued = dataset_generation_pb2.ContinueConversationsRequest(conversations=[conversation])
    assert [v.field for v in await map_violations(continued)] == ["conversations[0].metadata"]
    assert await map_violations(ds.AddDatasetItemsRequest(items=[item_pb2.Item(metadata={"k": "v"})])) == []


async def test_map_violations_counts_a_recorded_responses_tool_call_arguments_before_anything_copies_them() -> None:
    """AddDatasetItems fingerprinted and copied 16 MB of tool-call arguments (22 calls of 65,536 fields:
    ~1.8 s of the loop) before its validation counted them: the pre-check counts them (up to the bound)."""
    calls = []
    for _ in range(2):
        arguments = struct_pb2.Struct()
        arguments.update({f"f{i}": None for i in range(MAX_STRUCT_VALUES // 2)})
        calls.append(item_pb2.ToolCall(name="t", arguments=arguments))
    over = item_pb2.Item(input="q", response=item_pb2.Response(tool_calls=calls))
    request = ds.AddDatasetItemsRequest(dataset_id="d", items=[item_pb2.Item(input="p"), over])
    assert [v.field for v in await map_violations(request)] == ["items[1].response.tool_calls"]
    for name in ("f0", "f1"):  # 2 objects + 9,998 values: at the bound
        del request.items[1].response.tool_calls[1].arguments.fields[name]
    assert await map_violations(request) == []


def test_an_update_mask_is_bounded_before_its_paths_are_read() -> None:
    updatable = ("display_name", "annotations")
    keys = [f"annotations.k{i}" for i in range(MAX_MASK_KEYS)]
    assert len(mask_paths([*updatable, *keys], updatable, MAX_MASK_KEYS)) == len(updatable) + MAX_MASK_KEYS
    with pytest.raises(ServiceError) as refused:
        mask_paths([*updatable, *keys, "annotations.one-more"], updatable, MAX_MASK_KEYS)
    [violation] = refused.value.violations
    assert violation.field == "update_mask" and violation.description.startswith(
        f"at most {len(updatable) + MAX_MASK_KEYS} paths"
    )
    with pytest.raises(ServiceError):  # no map keys: the fields alone
        mask_paths(["display_name", "display_name", "annotations"], updatable)


def test_event_types_are_known_and_each_named_once() -> None:
    out: list[FieldViolation] = []
    assert _check_event_types(["run.failed", "run.created"], "webhook.event_types", out) and out == []
    assert not _check_event_types(["run.failed", "run.exploded", "run.failed"], "webhook.event_types", out)
    assert [v.field for v in out] == ["webhook.event_types[1]", "webhook.event_types[2]"]
    out.clear()
    assert not _check_event_types(["run.failed"] * 1_300_000, "webhook.event_types", out)
    assert [v.field for v in out] == ["webhook.event_types"]


def test_a_definition_over_its_size_is_refused_for_that_alone_before_its_parts_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CreateTarget converted a chat target's parameters (Python, on the event loop) after finding the
    definition over its 256 KiB: 8 Structs of 65,536 keys held every tenant's calls ~1.4 s, for a
    refusal. A target or grader over the size is refused naming that, its parts never read."""
    read: list[str] = []
    monkeypatch.setattr(targets, "check_chat_settings", lambda *args: read.append("chat settings"))
    monkeypatch.setattr(grader_validation, "validate_builtin", lambda *args: read.append("grader") or [])
    parameters = struct_pb2.Struct()
    parameters.update({f"p{i}": i for i in range(MAX_DEFINITION_BYTES // 8)})
    chat = target_pb2.Target(chat=target_pb2.ChatTarget(model="m", parameters=parameters))
    [too_large] = targets.validate_target(chat, "target")
    assert too_large.field == "target" and too_large.description.startswith("the definition is ")
    contains = grader_pb2.Grader(contains=grader_pb2.Contains(values=["v" * 1000] * (MAX_DEFINITION_BYTES // 1000)))
    [too_large] = grader_validation.validate_grader(contains, "graders[0]")
    assert too_large.field == "graders[0]" and too_large.description.startswith("the definition is ")
    assert read == []
    targets.validate_target(target_pb2.Target(chat=target_pb2.ChatTarget(model="m")), "target")
    assert read == ["chat settings"]  # a definition within the size is read as before
