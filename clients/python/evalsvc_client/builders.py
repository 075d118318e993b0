"""Small constructors for targets, graders and items, so callers need not touch the generated modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from evalsvc_client import pb


def provided(model_id: str = "") -> pb.Target:
    """Outputs are the responses recorded on the items."""
    return pb.Target(provided=pb.target.ProvidedTarget(), model_id=model_id)


def echo(model_id: str = "") -> pb.Target:
    """Output is each item's input (smoke tests)."""
    return pb.Target(echo=pb.target.EchoTarget(), model_id=model_id)


def exact_match(
    name: str = "exact_match", *, case_insensitive: bool = False, normalize_whitespace: bool = False, weight: float = 0
) -> pb.Grader:
    return pb.Grader(
        name=name,
        weight=weight,
        exact_match=pb.grader.ExactMatch(case_insensitive=case_insensitive, normalize_whitespace=normalize_whitespace),
    )


def contains(
    values: Iterable[str],
    name: str = "contains",
    *,
    all: bool = False,
    case_insensitive: bool = False,
    weight: float = 0,
) -> pb.Grader:
    return pb.Grader(
        name=name,
        weight=weight,
        contains=pb.grader.Contains(values=list(values), all=all, case_insensitive=case_insensitive),
    )


def regex(
    pattern: str = "",
    name: str = "regex",
    *,
    full_match: bool = False,
    case_insensitive: bool = False,
    weight: float = 0,
) -> pb.Grader:
    return pb.Grader(
        name=name,
        weight=weight,
        regex=pb.grader.Regex(pattern=pattern, full_match=full_match, case_insensitive=case_insensitive),
    )


def json_match(
    name: str = "json_match", *, subset: bool = False, valid_only: bool = False, weight: float = 0
) -> pb.Grader:
    return pb.Grader(name=name, weight=weight, json_match=pb.grader.JsonMatch(subset=subset, valid_only=valid_only))


def similarity(
    threshold: float = 0.8, name: str = "similarity", *, case_insensitive: bool = False, weight: float = 0
) -> pb.Grader:
    return pb.Grader(
        name=name,
        weight=weight,
        similarity=pb.grader.Similarity(threshold=threshold, case_insensitive=case_insensitive),
    )


def tool_calls(
    expected: Iterable[str] = (),
    name: str = "tool_calls",
    *,
    allow_additional: bool = False,
    expected_arguments: Mapping[str, Mapping[str, Any]] | None = None,
    weight: float = 0,
) -> pb.Grader:
    arguments: dict[str, struct_pb2.Struct] = {}
    for tool, args in (expected_arguments or {}).items():
        value = struct_pb2.Struct()
        value.update(dict(args))
        arguments[tool] = value
    return pb.Grader(
        name=name,
        weight=weight,
        tool_calls=pb.grader.ToolCalls(
            expected=list(expected), allow_additional=allow_additional, expected_arguments=arguments
        ),
    )


def latency(max_ms: float, name: str = "latency", *, weight: float = 0) -> pb.Grader:
    return pb.Grader(name=name, weight=weight, latency=pb.grader.Latency(max_ms=max_ms))


def cost(max_usd: float, name: str = "cost", *, weight: float = 0) -> pb.Grader:
    return pb.Grader(name=name, weight=weight, cost=pb.grader.Cost(max_usd=max_usd))


def item(
    input: str,
    expected_output: str = "",
    *,
    id: str = "",
    response: str | None = None,
    cost_usd: float = 0.0,
    latency_ms: float = 0.0,
    metadata: Mapping[str, str] | None = None,
) -> pb.Item:
    """An item; `response` records the output the provided target will return."""
    message = pb.Item(id=id, input=input, expected_output=expected_output, metadata=dict(metadata or {}))
    if response is not None:
        message.response.CopyFrom(pb.Response(content=response, cost_usd=cost_usd, latency_ms=latency_ms))
    return message
