"""Field checks every create and update request shares: lengths, labels, annotations, items.

Leaf code (no I/O, no service): the services validate their requests with it and the gateway's
dialects take its limits, so every door refuses the same things. Checks append to a list, so a
caller fixes a request in one round trip.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from operator import attrgetter

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from evalsvc.errors import FieldViolation, invalid_argument
from evalsvc.http.outbound import check_url_shape
from evalsvc.messages.canonical import NOT_JSON_VALUES, struct_values
from evalsvc.turns import Turns
from evalsvc.v1 import item_pb2

MAX_REQUEST_ID = 128
MAX_DISPLAY_NAME = 256
MAX_DESCRIPTION = 1024
MAX_ITEM_ID = 128
MAX_IMAGES = 16  # image URLs of one recorded response
# Who may speak in a conversation (item.proto, docs/spec.md); empty is taken as "user".
ROLES = ("system", "user", "assistant", "tool")
_SPOKEN = frozenset(("", *ROLES))
_ROLE = attrgetter("role")
# Turns of one conversation (an item's, or one that ContinueConversations continues), and of all the
# conversations of one request together (docs/spec.md, "Conversation turns"). Every turn costs time on the event
# loop, and an empty one is only two bytes on the wire: one item of 3,000,000 empty turns (6 MB) held
# every other tenant's call for half a second, eight of them for seconds. The walks over a request's
# turns (validation, the NUL check, the copy) give the loop turns as they go; the request's bound keeps
# the whole of them near a second of the interpreter per request (~0.2-0.4 s per million turns for the
# NUL check) while a run of 100,000 items of a few turns each (the largest run, --max-items-per-run)
# still fits in one CreateRun; the per-conversation one is far above any transcript a model's context
# holds. (Parsing the request is C that cannot yield; only --max-message-bytes bounds it.)
MAX_CONVERSATION_TURNS = 10_000
MAX_REQUEST_TURNS = 1_000_000
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_LABEL_VALUE = 63
# Labels per run, dataset, grader or target, and label filters per list request (as Google Cloud's 64).
MAX_LABELS = 64
MAX_ANNOTATION_KEY = 128
MAX_ANNOTATIONS_BYTES = 64 * 1024
# One grader's or target's definition, serialized. Every Run a call or an event returns repeats its
# definitions, so they are bounded where they come in (a run's together, by a quarter of
# --max-message-bytes: evalsvc.runs.service); a 16 MB grader made a run that no call could read back.
MAX_DEFINITION_BYTES = 256 * 1024


def missing_required(request: Message) -> list[FieldViolation]:
    """A violation per id of the request that the contract marks REQUIRED (AIP-203: a `..._id` string,
    the resource a call is about) and that is empty. Checked for every RPC before its method: an empty
    run id was NOT_FOUND "run '' not found", as if a run could be named so. (Other REQUIRED fields are
    the services' to check: some have a default when empty, e.g. a generation's instructions. A
    `validate_only` request checks the rest: the resource it names may not exist yet.)"""
    if getattr(request, "validate_only", False):
        return []
    return [
        FieldViolation(name, "is required")
        for name in _required_strings(request.DESCRIPTOR)
        if not getattr(request, name)
    ]


@functools.cache
def _required_strings(message: Descriptor) -> tuple[str, ...]:
    return tuple(
        field.name
        for field in message.fields
        if field.type == FieldDescriptor.TYPE_STRING
        and field.name.endswith("_id")
        and not field.is_repeated
        and field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    )


FULL_REPLACEMENT = "*"  # AIP-134: an update mask of every updatable field


def mask_paths(paths: Sequence[str], updatable: Sequence[str]) -> list[str]:
    """An update mask's paths, AIP-134's `*` spelled out as every updatable field (so the request
    replaces them all: what it leaves unset is cleared), each path once. INVALID_ARGUMENT when `*` comes
    with other paths (AIP-134 allows it alone: `*,annotations.k` was taken as `*`)."""
    if FULL_REPLACEMENT in paths and len(paths) > 1:
        raise invalid_argument([FieldViolation("update_mask", "* names every updatable field: send it alone")])
    spelled = [name for path in paths for name in (updatable if path == FULL_REPLACEMENT else (path,))]
    return list(dict.fromkeys(spelled))


def check_length(value: str, limit: int, field: str, out: list[FieldViolation]) -> None:
    """Append a violation when value is longer than limit characters."""
    if len(value) > limit:
        out.append(FieldViolation(field, f"must be at most {limit} characters (got {len(value)})"))


def check_definition_size(definition: Message, field: str, out: list[FieldViolation]) -> None:
    """A grader's or target's definition is at most MAX_DEFINITION_BYTES, serialized."""
    if (size := definition.ByteSize()) > MAX_DEFINITION_BYTES:
        out.append(FieldViolation(field, f"the definition is {size} bytes; at most {MAX_DEFINITION_BYTES}"))


def check_labels(labels: Mapping[str, str], field: str, out: list[FieldViolation]) -> None:
    """At most MAX_LABELS labels; keys are 1-63 of [a-z0-9_-] starting with a letter; values at most 63
    characters. The count is checked first: a request of 50,000 labels held the event loop for a second."""
    if len(labels) > MAX_LABELS:
        out.append(FieldViolation(field, f"at most {MAX_LABELS} labels (got {len(labels)})"))
        return
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):  # `match` with `$` took a key ending in a newline
            out.append(FieldViolation(f"{field}[{key}]", "key must match [a-z][a-z0-9_-]{0,62}"))
        check_length(value, MAX_LABEL_VALUE, f"{field}[{key}]", out)


def check_annotations(annotations: Mapping[str, str], field: str, out: list[FieldViolation]) -> None:
    """Annotation keys are 1-128 characters; keys and values together at most 64 KiB (AIP-128)."""
    for key in annotations:
        if not key or len(key) > MAX_ANNOTATION_KEY:
            out.append(FieldViolation(f"{field}[{key[:MAX_ANNOTATION_KEY]}]", "key must be 1-128 characters"))
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        out.append(FieldViolation(field, f"keys and values must total at most {MAX_ANNOTATIONS_BYTES} bytes"))


async def check_items(
    items: Sequence[item_pb2.Item],
    field: str,
    out: list[FieldViolation],
    max_items: int | None = None,
    id_field: str = "id",
) -> None:
    """Items need unique ids of at most 128 characters (empty ids are assigned before this check), a
    conversation's roles are the documented ones, a recorded response's measurements must be numbers a
    grader and an aggregate can use and its tool calls' arguments JSON values. Gives the event loop turns
    between items (evalsvc.turns): a CreateRun holds up to 100,000. `id_field` names the id in the
    request, where its message calls it otherwise (a conversation's `item_id`)."""
    if max_items is not None and len(items) > max_items:
        out.append(FieldViolation(field, f"at most {max_items} items per request (got {len(items)})"))
        return
    seen: set[str] = set()
    turns = Turns()
    for i, item in enumerate(items):
        check_length(item.id, MAX_ITEM_ID, f"{field}[{i}].{id_field}", out)
        if item.id in seen:
            out.append(FieldViolation(f"{field}[{i}].{id_field}", f"duplicate item id {item.id[:MAX_ITEM_ID]!r}"))
        seen.add(item.id)
        check_roles(item.conversation, f"{field}[{i}].conversation", out)
        if item.HasField("response"):
            check_measurements(item.response, f"{field}[{i}].response", out)
            check_images(item.response, f"{field}[{i}].response", out)
            check_tool_calls(item.response, f"{field}[{i}].response", out)
        await turns.tick(1 + len(item.conversation))  # each turn's role was read


def check_images(response: item_pb2.Response, field: str, out: list[FieldViolation]) -> None:
    """A response's images are a few http(s) URLs (where they may be fetched from is checked when a
    judge is about to be shown them: the SSRF rule needs the address they resolve to then)."""
    if len(response.image_urls) > MAX_IMAGES:
        out.append(FieldViolation(f"{field}.image_urls", f"at most {MAX_IMAGES} images"))
        return
    for i, url in enumerate(response.image_urls):
        if problem := check_url_shape(url):
            out.append(FieldViolation(f"{field}.image_urls[{i}]", problem))


def check_roles(messages: Sequence[item_pb2.Message], field: str, out: list[FieldViolation]) -> None:
    """Each turn's role is one of ROLES, or empty (a user's): any other text ("wizard", "USER", 5,000
    characters) was stored and sent on to chat targets as the role of a message. The roles are first
    gathered in C (a set of them): the turn-by-turn loop, with its field paths, runs only when one is
    wrong."""
    if _SPOKEN.issuperset(map(_ROLE, messages)):
        return
    for j, message in enumerate(messages):
        if message.role and message.role not in ROLES:
            out.append(FieldViolation(f"{field}[{j}].role", f"must be one of {', '.join(ROLES)} (or empty: user)"))


async def turn_violations(request: Message) -> list[FieldViolation]:
    """A violation per conversation of the request longer than MAX_CONVERSATION_TURNS, and one when all
    of them together pass MAX_REQUEST_TURNS. Generic over requests (checked for every RPC before the
    NUL walk, evalsvc.api.status): any repeated field whose elements hold a repeated `Message` field
    (CreateRun's and AddDatasetItems' `items[].conversation`, ContinueConversations'
    `conversations[].turns`). It reads each element's count only (no turn is touched), so an oversized
    request is refused for about the cost of its parse, before the walks whose cost the bound limits."""
    out: list[FieldViolation] = []
    turns = Turns()
    for outer, inner in conversation_fields(request.DESCRIPTOR):
        total = 0
        for i, element in enumerate(getattr(request, outer.name)):
            count = len(getattr(element, inner.name))
            total += count
            if count > MAX_CONVERSATION_TURNS:
                out.append(FieldViolation(f"{outer.name}[{i}].{inner.name}", too_many_turns(count)))
            await turns.tick()
        if total > MAX_REQUEST_TURNS:
            out.append(FieldViolation(outer.name, too_many_turns_together(total)))
    return out


def too_many_turns(count: int) -> str:
    """The violation of a conversation of `count` turns, over MAX_CONVERSATION_TURNS."""
    return f"at most {MAX_CONVERSATION_TURNS} turns (got {count})"


def too_many_turns_together(total: int) -> str:
    """The violation of a request's conversations of `total` turns together, over MAX_REQUEST_TURNS."""
    return f"at most {MAX_REQUEST_TURNS} conversation turns per request, all together (got {total})"


@functools.cache
def conversation_fields(message: Descriptor) -> tuple[tuple[FieldDescriptor, FieldDescriptor], ...]:
    """(outer, inner) for each repeated message field `outer` of a request whose elements have a
    repeated field `inner` of conversation turns (evalsvc.v1.Message): where `turn_violations` counts."""
    return tuple(
        (field, inner)
        for field in message.fields
        if field.is_repeated and field.message_type is not None and not field.message_type.GetOptions().map_entry
        for inner in field.message_type.fields
        if inner.is_repeated
        and inner.message_type is not None
        and inner.message_type.full_name == item_pb2.Message.DESCRIPTOR.full_name
    )


def check_tool_calls(response: item_pb2.Response, field: str, out: list[FieldViolation]) -> None:
    """A recorded tool call's arguments hold JSON values, as a target's parameters must: a NaN or an
    Infinity was stored, and every REST read of the item or its results then failed (proto3 JSON has no
    such number)."""
    for j, call in enumerate(response.tool_calls):
        if call.arguments.fields and struct_values(call.arguments) is None:
            out.append(FieldViolation(f"{field}.tool_calls[{j}].arguments", NOT_JSON_VALUES))


def check_measurements(response: item_pb2.Response, field: str, out: list[FieldViolation]) -> None:
    """Cost, latency, memory and token counts are finite and not negative: a NaN would make every
    latency and cost grader and the run's aggregate meaningless, silently."""
    for name in ("cost_usd", "latency_ms", "memory_mib"):
        value = getattr(response, name)
        if not (math.isfinite(value) and value >= 0):
            out.append(FieldViolation(f"{field}.{name}", "must be a finite number >= 0"))
    for name in ("prompt_tokens", "completion_tokens"):
        if getattr(response, name) < 0:
            out.append(FieldViolation(f"{field}.{name}", "must be >= 0"))


async def assign_item_ids(items: Sequence[item_pb2.Item], start: int = 0) -> None:
    """Give items without an id one derived from their position (`item-1`, `item-2`, ...), with turns
    for the event loop between items (evalsvc.turns)."""
    turns = Turns()
    for i, item in enumerate(items):
        if not item.id:
            item.id = f"item-{start + i + 1}"
        await turns.tick(1 + len(item.conversation))  # each turn's role was read
