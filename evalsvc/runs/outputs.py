"""Listed results' outputs and explanations (ListRunResults, ListComparisonItems): read only for the
results a page keeps, and cut so that every listed result fits in a response.

A page is chosen from its results' sizes (the rows without their explanations, and the stored sizes of
their explanations and outputs: store.runs `results_sized`) before any output or explanation is read, so
it reads about its byte bound (`PageTokens.page_bytes`), never its `page_size` outputs or explanations
whole. Each listed result is bounded too (its `share`: `PageTokens.item_bytes` for a result of
ListRunResults; for each side of a comparison item, what the other side leaves of it, at least half:
`side_shares`): an output or explanation larger than what the rest of the result leaves of the share is
listed cut short, and `Result.output_truncated` or
`Result.explanation_truncated` says so. Outputs of recorded (provided) and echo targets may be as large as
an item (up to --max-message-bytes): one such result was a response over --max-message-bytes, and a
comparison item carries two outputs, so two over 8 MB never fitted however small the page (INTERNAL for
good). A judge's explanation may be a quarter of --max-message-bytes (--max-reply-bytes), and more when
the server was restarted with a smaller --max-message-bytes than the run was judged under.
"""

from __future__ import annotations

from evalsvc.v1 import item_pb2, run_pb2

# What the output and explanation fields add to a result besides their bytes: a tag (1 byte) and length
# (up to 5) each, and `output_truncated` and `explanation_truncated` (2-byte tag and 1 byte each),
# rounded up.
FRAMING = 32


def room(result: run_pb2.Result, output_bytes: int | None, explanation_bytes: int, share: int) -> tuple[int, int]:
    """The bytes of its output and of its explanation that `result` (built without either) keeps listed
    within `share`: both whole when they fit; else the explanation keeps what the output leaves, at least
    half of the room (a short explanation stays whole beside a cut output, a short output beside a cut
    explanation), and the output the rest."""
    output_bytes = output_bytes or 0
    budget = max(share - result.ByteSize() - FRAMING, 0)
    if output_bytes + explanation_bytes <= budget:
        return output_bytes, explanation_bytes
    explanation = min(explanation_bytes, max(budget - output_bytes, budget // 2))
    return min(output_bytes, budget - explanation), explanation


def side_shares(total: int, needs: tuple[int, int]) -> tuple[int, int]:
    """How two results listed side by side (a comparison item's baseline and candidate) split `total`
    bytes, given what each takes listed whole (`needs`): each whole when both fit; else a side that
    fits in half of `total` keeps what it needs and the other takes the rest; else half each. The two
    shares never pass `total` together (a result cut to its share is listed within it). A side was held
    to half even beside an empty one: an empty baseline output left a 12 MB candidate output cut in a
    16 MiB response that had room for it."""
    half = total // 2
    first, second = needs
    if first + second <= total:
        first += (total - first - second) // 2  # the slack shared: a size read before a row changed
        return first, total - first
    if first <= half:
        return first, total - first
    if second <= half:
        return total - second, second
    return half, total - half


def listed_size(result: run_pb2.Result, output_bytes: int | None, share: int, explanation_bytes: int = 0) -> int:
    """The most `result` (built without its output and explanation) is listed with an output of
    `output_bytes` (stored, serialized; None or 0 for none) and an explanation of `explanation_bytes`
    (UTF-8), cut to `share` as `attach_output` cuts them: what a page is chosen by."""
    if not output_bytes and not explanation_bytes:
        return result.ByteSize()
    output, explanation = room(result, output_bytes, explanation_bytes, share)
    return result.ByteSize() + output + explanation + FRAMING


def attach_output(result: run_pb2.Result, output: bytes | None, share: int, explanation: str = "") -> None:
    """Set `explanation` and parse `output` (serialized; None when there is none) into `result` (built
    without either), cut so that the result is at most `share` bytes (`room`, from their actual sizes:
    a row may have changed since its sizes were read): the explanation and the output's content cut from
    their end at a character boundary (the output's tool calls and image URLs dropped, were that not
    enough), and `explanation_truncated` or `output_truncated` set."""
    text = explanation.encode()
    keep_output, keep_explanation = room(result, len(output or b""), len(text), share)
    if keep_explanation < len(text):
        result.explanation_truncated = True
        text = text[:keep_explanation]
    # Cut inside a character, its leading bytes are not UTF-8: "ignore" drops them, nothing else (the text was).
    result.explanation = text.decode("utf-8", "ignore")
    if not output:
        return
    result.output.MergeFromString(output)
    if len(output) <= keep_output:
        return
    result.output_truncated = True
    cut(result.output, keep_output)


def cut(response: item_pb2.Response, budget: int) -> None:
    """Make `response` at most `budget` bytes: its content cut first (from the end, never inside a
    character), then its tool calls and image URLs dropped, then everything."""
    excess = response.ByteSize() - budget
    if excess <= 0:
        return
    content = response.content.encode()
    # A shorter content shortens its length prefix too, never lengthens it: cutting `excess` bytes suffices.
    response.content = content[: max(len(content) - excess, 0)].decode("utf-8", "ignore")
    if response.ByteSize() > budget:
        del response.tool_calls[:]
        del response.image_urls[:]
    if response.ByteSize() > budget:
        response.Clear()
