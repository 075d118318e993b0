"""Targets: what produces an output for an item.

A target either returns a `Response` or raises `TargetError`; the executor records a target error
as an ERROR result for every grader of that evaluation. Every string of an endpoint's reply is made
storable (`storable_json`: NUL and lone surrogates become U+FFFD) before it becomes an output, so
what is graded, stored and returned is the same text on every database engine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from google.protobuf import json_format, struct_pb2

from evalsvc.errors import FieldViolation
from evalsvc.http.json_bodies import MAX_VALUES, loads, most_values
from evalsvc.http.outbound import (
    Outbound,
    OutboundError,
    check_url_shape,
    endpoint_headers,
    endpoint_secret_values,
    secret_refs,
)
from evalsvc.messages.canonical import NOT_JSON_VALUES, struct_values
from evalsvc.messages.oneofs import one_of
from evalsvc.messages.validation import check_definition_size
from evalsvc.storable import storable_json
from evalsvc.v1 import item_pb2, target_pb2

_T = TypeVar("_T")


class TargetError(Exception):
    """The target could not produce an output for an item; `reason` is recorded on its results."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Target(Protocol):
    """Produces the output for one item."""

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The target's output for the item."""
        ...


PRICE_KEYS = ("input_per_mtok", "output_per_mtok")


class PriceTable:
    """USD per million prompt and completion tokens, by model name."""

    def __init__(self, prices: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self._prices = dict(prices or {})

    @classmethod
    def from_file(cls, path: str) -> PriceTable:
        """Load `{"model": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}`; an empty path prices nothing.
        ValueError naming the file and what is wrong with it: a file of another shape was a TypeError
        at start (`[1, 2]`) or at the first costed call, and a price that is no number (`"a lot"`),
        negative or infinite, or under a misspelled key, was taken and made every cost of that model
        wrong."""
        if not path:
            return cls()
        table = json.loads(Path(path).read_text())
        if not isinstance(table, dict):
            raise ValueError(f"{path} must hold a JSON object of models, not {_json_kind(table)}")
        for model, price in table.items():
            if not isinstance(price, dict):
                raise ValueError(f"{path}: model {model!r} must be an object with {' and/or '.join(PRICE_KEYS)}")
            for key, value in price.items():
                if key not in PRICE_KEYS:
                    raise ValueError(f"{path}: model {model!r} has {key!r}; a price is {' or '.join(PRICE_KEYS)}")
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                    raise ValueError(
                        f"{path}: model {model!r} {key} must be a finite number of USD, at least 0, not {value!r}"
                    )
        return cls(table)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """What the tokens cost; 0 for a model without a price."""
        price = self._prices.get(model)
        if price is None:
            return 0.0
        return (
            prompt_tokens * price.get("input_per_mtok", 0.0) + completion_tokens * price.get("output_per_mtok", 0.0)
        ) / 1e6


# The most tokens a reply may report for one call (int64 holds more; no model reads or writes this many).
MAX_REPORTED_TOKENS = 2**40


def reported_amount(value: Any, what: str) -> float:
    """A number a reply reports that is added up (cost in USD, memory in MiB): absent is 0; anything but a
    finite number at least 0 is a ValueError. A NaN or negative cost added to a tenant's spend switched off
    --tenant-budget-usd for good (NaN >= budget is never true; a stored -1000 is spent again), infinity
    ended every later run of the tenant, and NaN failed the result's storage."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number, not {_json_kind(value)}")
    try:
        amount = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer past a float (10**400)
        raise ValueError(f"{what} must be a finite number at least 0") from None
    if not 0 <= amount < math.inf:
        raise ValueError(f"{what} must be a finite number at least 0, not {value!r}")
    return amount


def reported_tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of an OpenAI-style `usage`: absent is 0; anything but a whole number
    from 0 to MAX_REPORTED_TOKENS is a ValueError (1e999 raised OverflowError past every handler, and
    a negative count made a negative cost)."""
    if usage is None:
        usage = {}
    if not isinstance(usage, dict):
        raise ValueError(f"usage must be a JSON object, not {_json_kind(usage)}")
    counts = []
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key)
        if value is None:
            counts.append(0)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_REPORTED_TOKENS:
            raise ValueError(f"usage.{key} must be a whole number from 0 to {MAX_REPORTED_TOKENS}, not {value!r}")
        if value != int(value):
            raise ValueError(f"usage.{key} must be a whole number, not {value!r}")
        counts.append(int(value))
    return counts[0], counts[1]


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: an array, a string."""
    kinds = ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"), (int | float, "a number"))
    return next((kind for python, kind in kinds if isinstance(value, python)), "null")


class ProvidedTarget:
    """Outputs were recorded beforehand: each item carries its response."""

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The item's recorded response."""
        if not item.HasField("response"):
            raise TargetError(f"item {item.id!r} has no recorded response for the provided target")
        return item.response


class EchoTarget:
    """Answers with the input, for smoke tests of graders and plumbing."""

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The item's input as the output."""
        return item_pb2.Response(content=item.input)


def answers_locally(target: Target) -> bool:
    """Whether a target answers without any I/O (recorded responses, echo): its calls never wait."""
    return isinstance(target, (ProvidedTarget, EchoTarget))


def replays_records(target: Target) -> bool:
    """Whether a target's outputs are the items' recorded responses: their `cost_usd` is what the call
    that produced them cost, elsewhere and before, not a call of the run's, so no budget counts it (a $1
    recorded cost stopped a run with a $0.50 budget before its first judge call)."""
    return isinstance(target, ProvidedTarget)


def chat_url(endpoint: target_pb2.Endpoint) -> str:
    """The Chat Completions URL of an OpenAI-compatible base URL."""
    return endpoint.base_url.rstrip("/") + "/chat/completions"


def chat_messages(system_prompt: str, item: item_pb2.Item) -> list[dict[str, str]]:
    """System prompt, then the item's context as a second system message (so a model sees what the
    dataset says it may use, e.g. retrieved passages or Agno's `additional_context`), then the item's
    conversation, then its input as the user's turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if item.context:
        messages.append({"role": "system", "content": f"Context:\n{item.context}"})
    messages.extend({"role": m.role or "user", "content": m.content} for m in item.conversation)
    if item.input:
        messages.append({"role": "user", "content": item.input})
    return messages


def tool_calls_from(raw: Any) -> list[item_pb2.ToolCall]:
    """ToolCalls from an OpenAI-style `tool_calls` list (arguments as a JSON string or object).

    Argument strings are parsed here, on the loop, within one budget of MAX_VALUES values for the whole
    reply (a dozen calls of 20,000 values each held the loop 350 ms); past it they stay text (`_raw`).
    So do arguments holding numbers JSON has not (NaN, Infinity, 1e999, which Python's json reads; an
    integer past a double): stored as numbers, they made every REST read of the results fail."""
    calls = []
    budget = MAX_VALUES
    for entry in raw or []:
        function = entry.get("function", entry) if isinstance(entry, dict) else {}
        arguments = function.get("arguments") or {}
        text = arguments if isinstance(arguments, str) else None
        if text is not None:
            cost = most_values(text)
            try:
                if cost > budget:
                    raise ValueError(f"past {MAX_VALUES:,} values of arguments in one reply")
                arguments = loads(text) if text.strip() else {}
                budget -= cost
            except ValueError:
                arguments = {"_raw": text}
        struct = struct_pb2.Struct()
        if isinstance(arguments, dict):
            try:
                struct.update(arguments)
                usable = struct_values(struct) is not None
            except (ValueError, OverflowError):  # OverflowError: an integer past a double (10**400)
                usable = False
            if not usable:
                struct = struct_pb2.Struct()
                struct.update({"_raw": text if text is not None else json.dumps(arguments, ensure_ascii=False)})
        calls.append(item_pb2.ToolCall(name=str(function.get("name", "")), arguments=struct))
    return calls


class ChatTarget:
    """An OpenAI-compatible Chat Completions endpoint."""

    def __init__(
        self, spec: target_pb2.ChatTarget, outbound: Outbound, prices: PriceTable, secrets: Mapping[str, str]
    ) -> None:
        self._spec = spec
        self._outbound = outbound
        self._secrets = secrets
        self._prices = prices
        self._url = chat_url(spec.endpoint)
        self._timeout = spec.endpoint.timeout_s or 60.0
        self._base: dict[str, Any] = {"model": spec.model}
        if spec.HasField("temperature"):
            self._base["temperature"] = spec.temperature
        if spec.max_tokens:
            self._base["max_tokens"] = spec.max_tokens
        if spec.tools:
            self._base["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": json_format.MessageToDict(tool.parameters),
                    },
                }
                for tool in spec.tools
            ]
        self._base.update(json_format.MessageToDict(spec.parameters))

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The model's reply to the item."""
        body = {**self._base, "messages": chat_messages(self._spec.system_prompt, item)}
        try:
            endpoint = self._spec.endpoint
            reply = await self._outbound.post_json(
                self._url,
                body,
                endpoint_headers(endpoint, self._secrets),
                self._timeout,
                secrets=endpoint_secret_values(endpoint, self._secrets),
            )
        except OutboundError as exc:
            raise TargetError(exc.reason) from exc
        body = storable_json(reply.body)
        try:
            choice = body["choices"][0]
            message = choice.get("message") or {}
            usage = body.get("usage")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise TargetError("the endpoint's reply has no choices[0].message") from exc
        try:
            prompt_tokens, completion_tokens = reported_tokens(usage)
            content = _reported(message.get("content"), str, "", "content", "a string")
            calls = _reported(message.get("tool_calls"), list, [], "tool_calls", "an array")
        except ValueError as exc:
            raise TargetError(f"the endpoint's reply: {exc}") from exc
        return item_pb2.Response(
            content=content,
            tool_calls=tool_calls_from(calls),
            latency_ms=reply.latency_ms,
            cost_usd=self._prices.cost(self._spec.model, prompt_tokens, completion_tokens),
            refused=bool(message.get("refusal")) or choice.get("finish_reason") == "content_filter",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )


class HttpTarget:
    """A custom agent's webhook: POST `{item: {...}}`, read `{content, tool_calls, cost_usd, refused, memory_mib}`."""

    def __init__(self, spec: target_pb2.HttpTarget, outbound: Outbound, secrets: Mapping[str, str]) -> None:
        self._spec = spec
        self._outbound = outbound
        self._secrets = secrets

    async def respond(self, item: item_pb2.Item) -> item_pb2.Response:
        """The agent's reply to the item."""
        body = {
            "item": {
                "id": item.id,
                "input": item.input,
                "context": item.context,
                "conversation": [{"role": m.role, "content": m.content} for m in item.conversation],
                "metadata": dict(item.metadata),
            }
        }
        endpoint = self._spec.endpoint
        try:
            reply = await self._outbound.post_json(
                endpoint.base_url,
                body,
                endpoint_headers(endpoint, self._secrets),
                endpoint.timeout_s or 60.0,
                secrets=endpoint_secret_values(endpoint, self._secrets),
            )
        except OutboundError as exc:
            raise TargetError(exc.reason) from exc
        answer = storable_json(reply.body)
        if not isinstance(answer, dict):
            raise TargetError("the webhook's reply is not a JSON object")
        try:
            cost = reported_amount(answer.get("cost_usd"), "cost_usd")
            memory = reported_amount(answer.get("memory_mib"), "memory_mib")
            content = _reported(answer.get("content"), str, "", "content", "a string")
            refused = _reported(answer.get("refused"), bool, False, "refused", "true or false")
            calls = _reported(answer.get("tool_calls"), list, [], "tool_calls", "an array")
        except ValueError as exc:
            raise TargetError(f"the webhook's reply: {exc}") from exc
        return item_pb2.Response(
            content=content,
            tool_calls=tool_calls_from(calls),
            cost_usd=cost,
            latency_ms=reply.latency_ms,
            refused=refused,
            memory_mib=memory,
        )


def _reported(value: Any, kind: type[_T], absent: _T, what: str, shape: str) -> _T:
    """A field of a webhook's reply that must be of one JSON type; absent (or null) is `absent`. Coerced,
    `"refused": "false"` was a refusal (judges were told the model refused) and a list became its
    Python text."""
    if value is None:
        return absent
    if not isinstance(value, kind):
        raise ValueError(f"{what} must be {shape}, not {_json_kind(value)}")
    return value


def build_target(spec: target_pb2.Target, outbound: Outbound, prices: PriceTable, secrets: Mapping[str, str]) -> Target:
    """The target a (validated, resolved) spec describes; `secrets` are the values its tenant may use."""
    kind = spec.WhichOneof("kind")
    if kind == "provided":
        return ProvidedTarget()
    if kind == "echo":
        return EchoTarget()
    if kind == "chat":
        return ChatTarget(spec.chat, outbound, prices, secrets)
    if kind == "http":
        return HttpTarget(spec.http, outbound, secrets)
    raise ValueError(f"target kind {kind!r} must be resolved before execution")


def sends_item_metadata(spec: target_pb2.Target) -> bool:
    """Whether a target is sent its items' metadata (and ids): a webhook is, with the item (`HttpTarget`),
    and may answer by them; a chat endpoint is sent the messages only, echo and provided targets call none.
    What the response cache keys an output by (evalsvc/execution/cache.py) and whether CompareRuns tells
    apart items that differ in metadata alone (evalsvc/runs/compare.py)."""
    return bool(spec.WhichOneof("kind") == "http")


def target_endpoint(spec: target_pb2.Target) -> target_pb2.Endpoint | None:
    """The endpoint a chat or http target calls; None for the other kinds."""
    kind = spec.WhichOneof("kind")
    return spec.chat.endpoint if kind == "chat" else spec.http.endpoint if kind == "http" else None


def target_secret_refs(spec: target_pb2.Target, path: str) -> list[tuple[str, str]]:
    """(field, name) of every secret a target names; which of them the tenant may use is
    evalsvc.secrets' question."""
    endpoint = target_endpoint(spec)
    return [] if endpoint is None else secret_refs(endpoint, f"{path}.{spec.WhichOneof('kind')}.endpoint")


MAX_TEMPERATURE = 2.0  # OpenAI's range; a value outside it fails every call to such an endpoint
MAX_TIMEOUT_S = 600.0


def check_endpoint(endpoint: target_pb2.Endpoint, at: str, out: list[FieldViolation]) -> None:
    """A target's or judge's endpoint: a well-formed URL (where it may lead is checked apart, with its
    address), a timeout that an attempt can have, and headers HTTP can send."""
    if problem := check_url_shape(endpoint.base_url):
        out.append(FieldViolation(f"{at}.base_url", problem))
    if not 0 <= endpoint.timeout_s <= MAX_TIMEOUT_S:  # also refuses NaN
        out.append(FieldViolation(f"{at}.timeout_s", f"must be between 0 and {MAX_TIMEOUT_S:g} seconds"))
    for name, value in endpoint.headers.items():
        if problem := header_problem(name, value):
            out.append(FieldViolation(f"{at}.headers[{name}]", problem))


# RFC 9110 5.1 (RFC 7230 3.2.6): a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A value HTTP/1.1 can carry as httpx sends it: ASCII without control characters but tab, and no
# space or tab at either end (h11 refuses those too).
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")


def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent, or None. Accepted as is, a value with CR/LF or a name with a space
    made every call fail before it was sent (h11's LocalProtocolError), so every evaluation of the run
    was an ERROR, each after its retries."""
    if not _HEADER_NAME.fullmatch(name):
        return "the header name must be a token (letters, digits and !#$%&'*+-.^_`|~)"
    if not _HEADER_VALUE.fullmatch(value):
        return (
            "the header value must be printable ASCII (tab allowed; no CR, LF, NUL or other control"
            " characters), not starting or ending with a space or tab"
        )
    return None


def check_chat_settings(chat: target_pb2.ChatTarget, at: str, out: list[FieldViolation]) -> None:
    """What a chat target sends with every request: accepted as is, a NaN temperature made every
    evaluation an ERROR with Python's words ("Out of range float values are not JSON compliant"), and a
    negative one or a negative `max_tokens` an endpoint's 400 on every call."""
    if not chat.model:
        out.append(FieldViolation(f"{at}.model", "the model name is required"))
    if chat.HasField("temperature") and not 0 <= chat.temperature <= MAX_TEMPERATURE:  # also refuses NaN
        out.append(FieldViolation(f"{at}.temperature", f"must be a finite number between 0 and {MAX_TEMPERATURE:g}"))
    if chat.max_tokens < 0:
        out.append(FieldViolation(f"{at}.max_tokens", "must be >= 0 (0 leaves it to the endpoint)"))
    if struct_values(chat.parameters) is None:
        out.append(FieldViolation(f"{at}.parameters", NOT_JSON_VALUES))
    for i, tool in enumerate(chat.tools):
        if struct_values(tool.parameters) is None:
            out.append(FieldViolation(f"{at}.tools[{i}].parameters", NOT_JSON_VALUES))


def validate_target(spec: target_pb2.Target, path: str) -> list[FieldViolation]:
    """Static problems of a target: one kind set, a saved one's id given, endpoints and chat settings
    that every call can send (secrets: `target_secret_refs`). A saved target is checked once resolved."""
    kind = spec.WhichOneof("kind")
    if kind is None:
        return [FieldViolation(path, one_of(spec, "kind"))]
    if kind == "saved_target_id":
        return [] if spec.saved_target_id else [FieldViolation(f"{path}.saved_target_id", "is required")]
    out: list[FieldViolation] = []
    check_definition_size(spec, path, out)
    if out:  # refused for its size alone: converting its parts (a chat's parameters Struct of 500,000
        return out  # keys, in Python) held the event loop ~1.5 s for every tenant before the refusal
    endpoint = target_endpoint(spec)
    if endpoint is not None:
        check_endpoint(endpoint, f"{path}.{kind}.endpoint", out)
    if kind == "chat":
        check_chat_settings(spec.chat, f"{path}.chat", out)
    return out
