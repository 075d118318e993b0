"""A page chosen by its rows' sizes (PageTokens.fitting_sizes) and listed outputs cut to fit one
response (evalsvc.runs.outputs): the bounds the list services rely on, without a server."""

from __future__ import annotations

import pytest

from evalsvc.ids import PageTokens
from evalsvc.runs.outputs import FRAMING, attach_output, cut, listed_size, side_shares
from evalsvc.v1 import item_pb2, run_pb2


def test_fitting_sizes_keeps_the_leading_rows_within_the_bound_and_always_one() -> None:
    tokens = PageTokens(page_bytes=100)
    assert tokens.fitting_sizes([]) == 0
    assert tokens.fitting_sizes([500, 1]) == 1  # one larger than the bound is a page on its own
    assert tokens.fitting_sizes([40, 60, 1]) == 2
    assert tokens.fitting_sizes([0, 0, 0]) == 3
    assert tokens.fitting_sizes(iter([50, 51, 1])) == 1
    messages = [item_pb2.Item(input="x" * 40) for _ in range(3)]
    assert tokens.fitting(messages) == tokens.fitting_sizes(m.ByteSize() for m in messages) == 2


def test_one_listed_message_fits_in_a_response_whatever_the_bound() -> None:
    """page_bytes is half of --max-message-bytes: one message may take the rest of a response's room."""
    tokens = PageTokens(page_bytes=8 << 20)
    assert tokens.item_bytes == (16 << 20) - PageTokens.RESPONSE_RESERVE
    assert PageTokens.RESPONSE_RESERVE > PageTokens.MAX_TOKEN_CHARS + 64


@pytest.mark.parametrize(
    ("needs", "shares"),
    [
        ((0, 900), (50, 950)),  # an empty side leaves the other all it needs, and more
        ((10, 2000), (10, 990)),  # a small side whole, the large one the rest (was 500)
        ((2000, 10), (990, 10)),
        ((700, 700), (500, 500)),  # two large sides: half each
        ((400, 400), (500, 500)),
    ],
)
def test_two_sides_share_their_room_each_whole_when_the_other_leaves_it(
    needs: tuple[int, int], shares: tuple[int, int]
) -> None:
    assert side_shares(1000, needs) == shares
    assert sum(side_shares(1000, needs)) <= 1000


@pytest.mark.parametrize("budget", [0, 1, 5, 100, 1001, 4000])
def test_a_cut_response_is_within_its_budget_and_its_content_a_prefix_at_a_character_boundary(budget: int) -> None:
    content = "a\U0001f600é" * 300
    response = item_pb2.Response(content=content, cost_usd=0.5, tool_calls=[item_pb2.ToolCall(name="f")])
    whole = response.ByteSize()
    cut(response, budget)
    assert response.ByteSize() <= budget
    assert content.startswith(response.content)
    if budget >= whole:
        assert response.ByteSize() == whole
    elif budget > 100:  # room left after the small fields: they are kept, the content is cut
        assert response.cost_usd == 0.5 and len(response.tool_calls) == 1 and response.content


def test_an_attached_output_is_whole_when_it_fits_and_cut_to_the_share_when_not() -> None:
    stored = item_pb2.Response(content="y" * 5000, latency_ms=3.0).SerializeToString()
    result = run_pb2.Result(id="1", run_id="run_1", item_id="i", grader="g", explanation="why")
    small = run_pb2.Result()
    small.CopyFrom(result)
    attach_output(small, stored, share=10_000)
    assert small.output.content == "y" * 5000 and not small.output_truncated
    assert small.ByteSize() <= listed_size(result, len(stored), 10_000)

    cut_short = run_pb2.Result()
    cut_short.CopyFrom(result)
    predicted = listed_size(cut_short, len(stored), 1000)
    attach_output(cut_short, stored, share=1000)
    assert cut_short.output_truncated and cut_short.output.latency_ms == 3.0
    assert 0 < len(cut_short.output.content) < 5000
    assert cut_short.ByteSize() <= predicted <= 1000

    none = run_pb2.Result()
    attach_output(none, None, share=1000)
    assert not none.HasField("output") and not none.output_truncated
    assert listed_size(none, None, 1000) == 0


@pytest.mark.parametrize(("explanation_chars", "output_chars"), [(10, 5000), (5000, 10), (5000, 5000), (10, 10)])
def test_an_explanation_and_an_output_share_the_room_and_a_cut_one_says_so(
    explanation_chars: int, output_chars: int
) -> None:
    """A judge's explanation may be a quarter of --max-message-bytes: beside a large output (or on a side
    of a comparison item) the result was over its share. Both are cut to it now, the explanation at a
    character boundary, keeping at least half of the room or what the output leaves; a short one of the
    two stays whole; each flag says which was cut."""
    explanation = "\U0001f600é" * explanation_chars  # 6 bytes a pair, 4-byte characters to cut inside
    stored = item_pb2.Response(content="y" * output_chars).SerializeToString()
    base = run_pb2.Result(id="1", run_id="run_1", item_id="i", grader="g")
    share = 8000
    predicted = listed_size(base, len(stored), share, len(explanation.encode()))
    result = run_pb2.Result()
    result.CopyFrom(base)
    attach_output(result, stored, share, explanation)
    assert result.ByteSize() <= predicted <= share
    assert explanation.startswith(result.explanation)
    assert result.explanation_truncated == (result.explanation != explanation)
    assert result.output_truncated == (len(result.output.content) < output_chars)
    fits = len(explanation.encode()) + len(stored) + FRAMING + base.ByteSize() <= share
    assert fits == (not result.explanation_truncated and not result.output_truncated)
    if explanation_chars == 10:
        assert result.explanation == explanation  # short: whole beside a cut output
    if output_chars == 10:
        assert result.output.content == "y" * 10  # short: whole beside a cut explanation
    if explanation_chars == output_chars == 5000:
        assert len(result.explanation.encode()) >= (share - base.ByteSize() - FRAMING) // 2 - 4
