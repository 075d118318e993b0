"""Small constructors for targets, graders and items, so callers need not touch the generated modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from google.protobuf import struct_pb2

from evalsvc_client import pb


def provided(model_id: str = "") -> pb.Target:
    """Outputs are the responses recorded on the items."""
    return pb.Target(provided=pb.target.ProvidedTarget(), model_id=model_id)


def echo(model_id: str = "") -> pb.Target:
    """Output is each item's input (smoke tests)."""
    return pb.Target(echo=pb.target.EchoTarget(), model_id=model_id)


def saved_target(target_id: str, model_id: str = "") -> pb.Target:
    """A target saved with `create_target`, resolved to its definition when the run is created.

    `model_id`, when given, replaces the saved one in the run's record.
    """
    return pb.Target(saved_target_id=target_id, model_id=model_id)


def endpoint(
    base_url: str,
    *,
    api_key_secret: str = "",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 0,
) -> pb.target.Endpoint:
    """An outbound endpoint. `api_key_secret` and header values "secret:NAME" name server-side secrets."""
    return pb.target.Endpoint(
        base_url=base_url, api_key_secret=api_key_secret, headers=dict(headers or {}), timeout_s=timeout_s
    )


def tool(name: str, description: str = "", parameters: Mapping[str, Any] | None = None) -> pb.target.Tool:
    """A function a chat target's model may call; `parameters` is its arguments' JSON Schema."""
    message = pb.target.Tool(name=name, description=description)
    if parameters is not None:
        message.parameters.update(dict(parameters))
    return message


def chat_target(
    base_url: str,
    model: str,
    *,
    api_key_secret: str = "",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 0,
    system_prompt: str = "",
    temperature: float | None = None,
    max_tokens: int = 0,
    parameters: Mapping[str, Any] | None = None,
    tools: Iterable[pb.target.Tool | Mapping[str, Any]] = (),
    model_id: str = "",
) -> pb.Target:
    """An OpenAI-compatible Chat Completions endpoint (`base_url` like "https://api.openai.com/v1").

    `parameters` (top_p, seed, ...) are merged into the request body; `tools` are `tool(...)` messages or
    mappings with the same keys.
    """
    chat = pb.target.ChatTarget(
        endpoint=endpoint(base_url, api_key_secret=api_key_secret, headers=headers, timeout_s=timeout_s),
        model=model,
        system_prompt=system_prompt,
        max_tokens=max_tokens,
        tools=[t if isinstance(t, pb.target.Tool) else tool(**dict(t)) for t in tools],
    )
    if temperature is not None:
        chat.temperature = temperature
    if parameters is not None:
        chat.parameters.update(dict(parameters))
    return pb.Target(chat=chat, model_id=model_id)


def http_target(
    url: str,
    *,
    api_key_secret: str = "",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 0,
    model_id: str = "",
) -> pb.Target:
    """A custom agent's webhook: each item is POSTed to `url`, which answers `{content, tool_calls, cost_usd}`."""
    return pb.Target(
        http=pb.target.HttpTarget(
            endpoint=endpoint(url, api_key_secret=api_key_secret, headers=headers, timeout_s=timeout_s)
        ),
        model_id=model_id,
    )


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


def saved_grader(grader_id: str, version: int = 0, name: str = "", *, weight: float = 0) -> pb.Grader:
    """A grader saved with `create_grader`, at `version` (0 = the latest when the run is created).

    An empty `name` or a zero `weight` takes the saved definition's (the name falls back to the grader's id).
    """
    return pb.Grader(name=name, weight=weight, saved=pb.grader.SavedGraderRef(grader_id=grader_id, version=version))


JudgeMode = Literal["accuracy", "criteria", "levels", "policy"]
JudgeScoring = Literal["binary", "numeric"]


def judge_level(key: str, description: str = "", *, passing: bool = False) -> pb.grader.JudgeLevel:
    """One answer a levels judge may give."""
    return pb.grader.JudgeLevel(key=key, description=description, passing=passing)


def llm_judge(
    mode: JudgeMode | pb.grader.LlmJudge.Mode,
    name: str = "llm_judge",
    *,
    criteria: str = "",
    scoring: JudgeScoring | pb.grader.LlmJudge.Scoring = pb.grader.LlmJudge.SCORING_UNSPECIFIED,
    threshold: int = 0,
    levels: Iterable[pb.grader.JudgeLevel | Mapping[str, Any]] = (),
    additional_guidelines: str = "",
    model: str = "",
    base_url: str = "",
    api_key_secret: str = "",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 0,
    weight: float = 0,
) -> pb.Grader:
    """A model judges the output. `mode` is "accuracy", "criteria", "levels" or "policy" (or the enum value);
    `scoring` ("binary" or "numeric") applies to criteria. Without `model` and `base_url` the server's default
    judge is used; `levels` are `judge_level(...)` messages or mappings with the same keys.
    """
    spec = pb.grader.LlmJudge(
        mode=_enum(pb.grader.LlmJudge.Mode, "MODE_", mode),
        criteria=criteria,
        scoring=_enum(pb.grader.LlmJudge.Scoring, "SCORING_", scoring),
        threshold=threshold,
        levels=[level if isinstance(level, pb.grader.JudgeLevel) else judge_level(**dict(level)) for level in levels],
        additional_guidelines=additional_guidelines,
        model=model,
    )
    if base_url:
        spec.endpoint.CopyFrom(endpoint(base_url, api_key_secret=api_key_secret, headers=headers, timeout_s=timeout_s))
    return pb.Grader(name=name, weight=weight, llm_judge=spec)


def _enum(wrapper: Any, prefix: str, value: str | int) -> Any:
    """An enum value from itself or from its name without the prefix, in any case ("accuracy" -> MODE_ACCURACY)."""
    if isinstance(value, str):
        try:
            return wrapper.Value(prefix + value.upper())
        except ValueError:
            names = [v.name.removeprefix(prefix).lower() for v in wrapper.DESCRIPTOR.values if v.number]
            raise ValueError(f"unknown {prefix.rstrip('_').lower()} {value!r}: expected one of {names}") from None
    return value


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
