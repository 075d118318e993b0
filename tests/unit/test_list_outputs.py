"""A page chosen by its rows' sizes (PageTokens.fitting_sizes): the bound the list services rely on,
without a server."""

from __future__ import annotations

from evalsvc.ids import PageTokens
from evalsvc.v1 import item_pb2


def test_fitting_sizes_keeps_the_leading_rows_within_the_bound_and_always_one() -> None:
    tokens = PageTokens(page_bytes=100)
    assert tokens.fitting_sizes([]) == 0
    assert tokens.fitting_sizes([500, 1]) == 1  # one larger than the bound is a page on its own
    assert tokens.fitting_sizes([40, 60, 1]) == 2
    assert tokens.fitting_sizes([0, 0, 0]) == 3
    assert tokens.fitting_sizes(iter([50, 51, 1])) == 1
    messages = [item_pb2.Item(input="x" * 40) for _ in range(3)]
    assert tokens.fitting(messages) == tokens.fitting_sizes(m.ByteSize() for m in messages) == 2
