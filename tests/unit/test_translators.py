"""The gateway's translator threads (evalsvc.gateway.translators): no network, no server."""

from __future__ import annotations

import gc
import json

import pytest

from evalsvc.gateway import translators
from evalsvc.gateway.translators import MAX_JSON_VALUES, TooManyValues, read_json


def test_a_body_is_read_as_json_up_to_its_budget_of_values() -> None:
    within = {"a": [1] * (MAX_JSON_VALUES - 2)}  # the object, the list and its numbers
    assert read_json(json.dumps(within).encode()) == within
    with pytest.raises(TooManyValues):
        read_json(json.dumps({"a": [1] * (MAX_JSON_VALUES - 1)}).encode())


def test_the_collector_is_paused_during_a_translation_and_enabled_after_even_when_it_fails() -> None:
    assert gc.isenabled()
    assert translators._collector.paused(gc.isenabled) is False

    def fails() -> None:
        raise ValueError("a body that does not parse")

    with pytest.raises(ValueError):
        translators._collector.paused(fails)
    assert gc.isenabled()


def test_translations_that_follow_one_another_pause_the_collector_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping large bodies (from any caller) must not keep the collector off for good: other
    calls' cyclic garbage would pile up for as long as they kept coming."""
    monkeypatch.setattr(translators, "MAX_GC_PAUSE_S", -1.0)  # any overlap has lasted long enough
    collector = translators._Collector()
    assert collector.paused(collector.paused, gc.isenabled) is True, "the overlapping one runs with it on"
    assert gc.isenabled()
