"""Listed results' outputs (ListRunResults, ListComparisonItems): read only for the results a page keeps,
and cut so that every listed result fits in a response.

A page is chosen from its results' sizes (the rows, and their outputs' stored sizes: store.runs
`results_sized`) before any output is read, so it reads about its byte bound (`PageTokens.page_bytes`),
never its `page_size` outputs whole. Each listed result is bounded too (its `share`: `PageTokens.item_bytes`
for a result of ListRunResults, half of it for each side of a comparison item): an output larger than what
the rest of the result leaves of the share is listed with its content cut short and
`Result.output_truncated` set. Outputs of recorded (provided) and echo targets may be as large as an item
(up to --max-message-bytes): one such result was a response over --max-message-bytes, and a comparison
item carries two outputs, so two over 8 MB never fitted however small the page (INTERNAL for good).
"""

from __future__ import annotations

from evalsvc.v1 import item_pb2, run_pb2

# What the output field adds to a result besides the output: its tag (1 byte) and length (up to 5), and
# `output_truncated` (2-byte tag and 1 byte), rounded up.
FRAMING = 16


def listed_size(result: run_pb2.Result, output_bytes: int | None, share: int) -> int:
    """The size `result` (built without its output) has listed with an output of `output_bytes` (stored,
    serialized; None or 0 for none), cut to `share` as `attach_output` cuts it: what a page is chosen by."""
    size = result.ByteSize()
    if output_bytes:
        size += min(output_bytes, max(share - size - FRAMING, 0)) + FRAMING
    return size


def attach_output(result: run_pb2.Result, output: bytes | None, share: int) -> None:
    """Parse `output` (serialized; None when there is none) into `result`, cut so that the result is at
    most `share` bytes: the content is cut from its end at a character boundary, then, were that not
    enough, the tool calls and image URLs dropped, and `output_truncated` set."""
    if not output:
        return
    budget = share - result.ByteSize() - FRAMING
    result.output.MergeFromString(output)
    if len(output) <= budget:
        return
    result.output_truncated = True
    cut(result.output, max(budget, 0))


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
