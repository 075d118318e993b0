"""Field checks every create and update request shares: lengths, labels, annotations, items.

Leaf code (no I/O, no service): the services validate their requests with it and the gateway's
dialects take its limits, so every door refuses the same things. Checks append to a list, so a
caller fixes a request in one round trip.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter

from google.api import field_behavior_pb2
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from evalsvc.errors import FieldViolation, invalid_argument
from evalsvc.http.outbound import check_url_shape
from evalsvc.messages.canonical import NOT_JSON_VALUES, struct_values
from evalsvc.turns import Turns
from evalsvc.v1 import dataset_generation_pb2, item_pb2

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
# A grader's name (the results table's grader column), and the graders of one run (result ids are
# job_id * 1024 + grader index; --max-graders-per-run is at most this). An item's `human_verdicts` are
# keyed by grader name, so they take the same bounds.
MAX_GRADER_NAME = 63
MAX_GRADERS = 1024
# An item's (and a continued conversation's) `metadata`: entries and key length. Every read of a stored
# item parses its maps, and protobuf's map parsing grows faster than the entries: one item of 700,000
# verdicts (9 MB) held every tenant's calls for many seconds at each read of it. 256 entries is far
# above what results are filtered or grouped by; a key is a name, at most 256 characters.
MAX_METADATA_ENTRIES = 256
MAX_METADATA_KEY = 256
# JSON values (leaves and containers, at any depth) in the arguments of one item's recorded tool calls
# together: a Struct of 400,000 fields held the event loop 3.2 s to convert. 10,000 is far above any
# tool call's arguments.
MAX_STRUCT_VALUES = 10_000
# Map keys one update mask may name (`annotations.KEY`, `labels.KEY`) besides its whole fields: each path
# is work on the event loop before anything is written (600,000 of them held it over a second). To change
# more keys, name the map whole and send it as it should be.
MAX_MASK_KEYS = 1_000
# Ids a request names a resource by where a missing one is not an error (a list filter's `dataset_id`):
# the server's ids are far shorter, caller-chosen ones (items, request ids) at most this.
MAX_RESOURCE_ID = 128


# Entries of the maps of items and conversations, by field: checked by `map_violations` for every request
# and by `check_metadata` and `check_human_verdicts` wherever items are checked.
MAP_ENTRIES = {
    item_pb2.Item.DESCRIPTOR.fields_by_name["metadata"].full_name: MAX_METADATA_ENTRIES,
    item_pb2.Item.DESCRIPTOR.fields_by_name["human_verdicts"].full_name: MAX_GRADERS,
    dataset_generation_pb2.Conversation.DESCRIPTOR.fields_by_name["metadata"].full_name: MAX_METADATA_ENTRIES,
}


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


def mask_paths(paths: Sequence[str], updatable: Sequence[str], max_keys: int = 0) -> list[str]:
    """An update mask's paths, AIP-134's `*` spelled out as every updatable field (so the request
    replaces them all: what it leaves unset is cleared), each path once. INVALID_ARGUMENT when `*` comes
    with other paths (AIP-134 allows it alone: `*,annotations.k` was taken as `*`), and when it has more
    paths than the updatable fields and `max_keys` single map keys (where a resource's maps take
    `FIELD.KEY` paths), counted before any path is looked at."""
    if len(paths) > (most := len(updatable) + max_keys):
        raise invalid_argument([FieldViolation("update_mask", too_many_paths(most, len(paths), max_keys))])
    if FULL_REPLACEMENT in paths and len(paths) > 1:
        raise invalid_argument([FieldViolation("update_mask", "* names every updatable field: send it alone")])
    spelled = [name for path in paths for name in (updatable if path == FULL_REPLACEMENT else (path,))]
    return list(dict.fromkeys(spelled))


def too_many_paths(most: int, count: int, max_keys: int) -> str:
    """The violation of an update mask of `count` paths, over `most`."""
    keys = f" (at most {max_keys} single map keys; to change more, name the map whole)" if max_keys else ""
    return f"at most {most} paths{keys} (got {count})"


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
    conversation's roles are the documented ones, metadata and human verdicts are bounded maps, a
    recorded response's measurements must be numbers a grader and an aggregate can use and its tool
    calls' arguments at most MAX_STRUCT_VALUES JSON values. Gives the event loop turns
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
        check_metadata(item.metadata, f"{field}[{i}].metadata", out)
        check_human_verdicts(item.human_verdicts, f"{field}[{i}].human_verdicts", out)
        if item.HasField("response"):
            check_measurements(item.response, f"{field}[{i}].response", out)
            check_images(item.response, f"{field}[{i}].response", out)
            check_tool_calls(item.response, f"{field}[{i}].response", out)
        await turns.tick(1 + len(item.conversation))  # each turn's role was read


def check_metadata(metadata: Mapping[str, str], field: str, out: list[FieldViolation]) -> None:
    """At most MAX_METADATA_ENTRIES entries, keys at most MAX_METADATA_KEY characters. The count is
    checked first (C, no entry touched): the entries are looked at only when there are few."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        out.append(FieldViolation(field, too_many_entries(MAX_METADATA_ENTRIES, len(metadata))))
        return
    for key in metadata:
        check_length(key, MAX_METADATA_KEY, f"{field}[{key[:MAX_METADATA_KEY]}]", out)


def check_human_verdicts(verdicts: Mapping[str, bool], field: str, out: list[FieldViolation]) -> None:
    """Keys are grader names, so at most MAX_GRADERS of them (a run has no more graders) of 1 to
    MAX_GRADER_NAME characters (no grader is named otherwise: such a verdict could never be compared).
    Whether a key names one of the run's graders is not checked: a dataset's items may carry verdicts for
    several runs' graders (docs/spec.md, "Judge calibration"). Counted first, as check_metadata."""
    if len(verdicts) > MAX_GRADERS:
        out.append(FieldViolation(field, too_many_entries(MAX_GRADERS, len(verdicts))))
        return
    for key in verdicts:
        if not 1 <= len(key) <= MAX_GRADER_NAME:
            out.append(
                FieldViolation(
                    f"{field}[{key[:MAX_GRADER_NAME]}]", f"a grader's name is 1-{MAX_GRADER_NAME} characters"
                )
            )


def too_many_entries(limit: int, count: int) -> str:
    """The violation of a map of `count` entries, over `limit` (MAP_ENTRIES)."""
    return f"at most {limit} entries (got {count})"


async def map_violations(request: Message) -> list[FieldViolation]:
    """A violation per element of a repeated field of the request whose map (of MAP_ENTRIES) holds more
    entries than its bound: CreateRun's and AddDatasetItems' `items[i].metadata` and
    `items[i].human_verdicts`, ContinueConversations' `conversations[i].metadata`. Generic over requests
    and checked for every RPC before anything else walks, copies or fingerprints the request (as
    `turn_violations`): it reads each map's size only, so an oversized map costs no more than its parse."""
    out: list[FieldViolation] = []
    turns = Turns()
    for outer, inner, limit in bounded_map_fields(request.DESCRIPTOR):
        for i, element in enumerate(getattr(request, outer.name)):
            if (count := len(getattr(element, inner.name))) > limit:
                out.append(FieldViolation(f"{outer.name}[{i}].{inner.name}", too_many_entries(limit, count)))
            await turns.tick()
    # A recorded response's tool-call arguments too (Structs: maps of their own): AddDatasetItems
    # fingerprinted and copied 16 MB of them (~1.8 s of the loop) before its validation counted them.
    for outer in item_fields(request.DESCRIPTOR):
        for i, item in enumerate(getattr(request, outer.name)):
            if item.response.tool_calls and (
                too_many := tool_call_values_violation(item.response, f"{outer.name}[{i}].response")
            ):
                out.append(too_many)
            await turns.tick()
    return out


ITEM_NAME = item_pb2.Item.DESCRIPTOR.full_name


@functools.cache
def item_fields(message: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The repeated Item fields of a request (CreateRun's and AddDatasetItems' `items`)."""
    return tuple(
        field for field in message.fields if field.is_repeated and field.message_type is item_pb2.Item.DESCRIPTOR
    )


@functools.cache
def bounded_map_fields(message: Descriptor) -> tuple[tuple[FieldDescriptor, FieldDescriptor, int], ...]:
    """(outer, inner, limit) for each repeated message field `outer` of a request whose elements have a
    map field `inner` bounded in MAP_ENTRIES: where `map_violations` counts."""
    return tuple(
        (field, inner, MAP_ENTRIES[inner.full_name])
        for field in message.fields
        if field.is_repeated and field.message_type is not None and not field.message_type.GetOptions().map_entry
        for inner in field.message_type.fields
        if inner.full_name in MAP_ENTRIES
    )


def count_struct_values(structs: Iterable[struct_pb2.Struct], limit: int) -> int:
    """The JSON values of `structs`: each Struct itself, and every field's and list element's value at
    any depth. Counted without recursion (an explicit stack) and only until the count passes `limit`,
    so the caller learns "over" having touched about `limit` values however many there are (the
    Structs are taken one at a time: there may be millions of empty ones)."""
    count = 0
    for struct in structs:
        stack: list[struct_pb2.Struct | struct_pb2.ListValue] = [struct]
        count += 1
        while stack and count <= limit:
            container = stack.pop()
            values = container.fields.values() if isinstance(container, struct_pb2.Struct) else container.values
            count += len(values)  # a container's size is known without touching its values
            if count > limit:
                break
            for value in values:
                kind = value.WhichOneof("kind")
                if kind == "struct_value":
                    stack.append(value.struct_value)
                elif kind == "list_value":
                    stack.append(value.list_value)
        if count > limit:
            break
    return count


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


def tool_call_values_violation(response: item_pb2.Response, field: str) -> FieldViolation | None:
    """The violation of a response whose tool calls' arguments hold more than MAX_STRUCT_VALUES values
    together (each arguments object counting one), counted only up to the bound."""
    arguments = (call.arguments for call in response.tool_calls)
    if (count := count_struct_values(arguments, MAX_STRUCT_VALUES)) <= MAX_STRUCT_VALUES:
        return None
    return FieldViolation(
        f"{field}.tool_calls",
        f"at most {MAX_STRUCT_VALUES} JSON values in all the calls' arguments together, each arguments "
        f"object counting one (counted {count} before stopping)",
    )


def check_tool_calls(response: item_pb2.Response, field: str, out: list[FieldViolation]) -> None:
    """A recorded tool call's arguments hold JSON values, as a target's parameters must: a NaN or an
    Infinity was stored, and every REST read of the item or its results then failed (proto3 JSON has no
    such number). All the calls' arguments together hold at most MAX_STRUCT_VALUES values, counted
    first: converting them is work on the event loop that grows with them, and so is every read."""
    if (too_many := tool_call_values_violation(response, field)) is not None:
        out.append(too_many)
        return
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
