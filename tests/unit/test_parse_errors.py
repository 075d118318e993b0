"""evalsvc.gateway.parse_errors: a proto3 JSON parse error as the field violation the caller reads."""

from __future__ import annotations

import time
from typing import Any

import pytest
from google.protobuf import json_format

from evalsvc.gateway.parse_errors import field_violation, proto_path
from evalsvc.v1 import eval_run_service_pb2 as pb


def violation(body: dict[str, Any], message: type = pb.CreateRunRequest) -> tuple[str, str] | None:
    with pytest.raises(json_format.ParseError) as raised:
        json_format.ParseDict(body, message())
    return field_violation(raised.value, message.DESCRIPTOR)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"repetitions": "abc"}, ("repetitions", "must be a whole number")),
        ({"labels": {"a": 1}}, ("labels[a]", "must be a string")),
        ({"items": [{"response": {"latencyMs": "x"}}]}, ("items[0].response.latency_ms", "must be a number")),
        ({"items": [{"response": {"latency_ms": "x"}}]}, ("items[0].response.latency_ms", "must be a number")),
        ({"passThreshold": "x"}, ("pass_threshold", "must be a number")),  # optional: no "Failed to parse" chain
        ({"passThreshold": [1]}, ("pass_threshold", "must be a number")),
        ({"items": [{}, {"expectedOutput": 1}]}, ("items[1].expected_output", "must be a string")),
        ({"target": {"chat": {"endpoint": {"timeoutS": "x"}}}}, ("target.chat.endpoint.timeout_s", "must be a number")),
        # json_format's message has no " at Type.path" for these: it named `items.response.prompt_tokens`.
        (
            {"items": [{}, {"response": {"promptTokens": "0x10"}}]},
            ("items[1].response.prompt_tokens", "must be a whole number"),
        ),
        (
            {"items": [{"response": {"promptTokens": "99999999999999999999"}}]},
            ("items[0].response.prompt_tokens", "is out of range for the field's type"),  # was protobuf's own words
        ),
        ({"repetitions": 2**70}, ("repetitions", "is out of range for the field's type")),
        ({"nope": 1}, ("nope", "unknown field")),
        ({"items": [{"nope": 1}]}, ("items[0].nope", "unknown field")),
        ({"target": {"chat": {"nope": 1}}}, ("target.chat.nope", "unknown field")),
        ({"target": {"provided": 3}}, ("target.provided", "must be a JSON object")),
        (
            {"trigger": "TRIGGER_SOMETIMES"},
            (
                "trigger",
                "unknown value TRIGGER_SOMETIMES; expected one of TRIGGER_MANUAL, TRIGGER_AUTO, TRIGGER_BACKFILL",
            ),
        ),
        ({"target": {"provided": {}, "echo": {}}}, ("target", "sets more than one field of a oneof")),
        ({"labels": {"team": "\ud800"}}, ("labels[team]", "Unpaired surrogate")),  # a map key in the path
        # A repeated field given no list: json_format's path ends at its message (it said `graders`).
        ({"graders": "x"}, ("graders", "must be a JSON list")),
        ({"items": [{"response": {"imageUrls": "x"}}]}, ("items[0].response.image_urls", "must be a JSON list")),
    ],
)
def test_a_wrong_value_is_its_field_and_plain_words(body: dict[str, Any], expected: tuple[str, str]) -> None:
    """Paths name fields as the proto does (AIP-193), whichever JSON name the caller wrote: the gateway
    said `items[0].response.latencyMs` where the service says `items[0].response.latency_ms`."""
    assert violation(body) == expected


@pytest.mark.parametrize("event_types", ["run.failed", {"a": 1}, 5])
def test_a_webhooks_event_types_given_no_list_are_named(event_types: Any) -> None:
    """The REST gateway named `webhook` for `{"webhook": {"eventTypes": "run.failed"}}`."""
    from evalsvc.v1 import webhook_service_pb2 as wpb

    body = {"webhook": {"url": "https://ci.example.com/h", "eventTypes": event_types}}
    assert violation(body, wpb.CreateWebhookRequest) == ("webhook.event_types", "must be a JSON list")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("items[3].expectedOutput", "items[3].expected_output"),
        ("labels[myKey]", "labels[myKey]"),  # a map key is data
        ("target.chat.parameters.fooBar", "target.chat.parameters.fooBar"),  # so is a Struct's
        ("target.chat.endpoint.headers[X-Api-Key]", "target.chat.endpoint.headers[X-Api-Key]"),
        ("passThreshold.madeUp.moreStuff", "pass_threshold.madeUp.moreStuff"),  # past a field: as given
        ("noSuchField.latencyMs", "noSuchField.latencyMs"),
    ],
)
def test_paths_take_the_protos_field_names_and_leave_data_as_it_is(path: str, expected: str) -> None:
    assert proto_path(path, pb.CreateRunRequest.DESCRIPTOR) == expected


def test_list_fields_of_a_query() -> None:
    assert violation({"statuses": "RUN_STATUS_RUNNING"}, pb.ListRunsRequest) == ("statuses", "must be a JSON list")
    assert violation({"pageSize": "x"}, pb.ListRunsRequest) == ("page_size", "must be a whole number")
    assert violation({"showDeleted": "maybe"}, pb.ListRunsRequest)[0] == "show_deleted"  # type: ignore[index]
    assert violation({"statuses": ["NAPPING"]}, pb.ListRunsRequest) == (
        "statuses[0]",
        "unknown value NAPPING; expected one of RUN_STATUS_PENDING, RUN_STATUS_RUNNING, RUN_STATUS_SUCCEEDED,"
        " RUN_STATUS_FAILED, RUN_STATUS_CANCELLED",
    )


def test_a_body_that_is_not_json_names_no_field() -> None:
    with pytest.raises(json_format.ParseError) as raised:
        json_format.Parse("{not json", pb.CreateRunRequest())
    assert field_violation(raised.value, pb.CreateRunRequest.DESCRIPTOR) is None


@pytest.mark.parametrize(
    "body",
    [
        {"target": {"chat": {"temperature": " at A" + "." * 200_000 + " "}}},
        {'a" has no field named "a" at "A' + "." * 200_000: 1},
        {"trigger": "X" * 200_000},
    ],
    ids=["dots-in-a-value", "crafted-unknown-field", "long-enum-value"],
)
def test_a_crafted_value_costs_its_length_once(body: dict[str, Any]) -> None:
    """The message quotes the caller's value and is read before the key is checked: regular expressions
    with overlapping classes took quadratic time in a run of dots (a 100 KB value: ~90 s of the event
    loop). 200,000 dots must take milliseconds; the bound is only a guard against that."""
    started = time.perf_counter()
    found = violation(body)
    assert time.perf_counter() - started < 0.5
    assert found is not None and len(found[0]) <= 512 + 128 and len(found[1]) <= 256


def test_a_field_name_cannot_forge_the_path() -> None:
    """An unknown field's name is the caller's, and may hold json_format's own words and a newline."""
    assert violation({'x" at "Foo.made.up\n': 1}) == ('x" at "Foo.made.up\n', "unknown field")
