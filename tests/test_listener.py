"""EventListener's dispatch of RUNS_ENDED_CHANNEL notifications and what it remembers, without a database."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest

from evalsvc.events import listener as listener_module
from evalsvc.events.bus import EventBus
from evalsvc.events.listener import EventListener
from evalsvc.ids import PROCESS_ID
from evalsvc.metrics import Metrics
from evalsvc.store.events import RUNS_ENDED_CHANNEL


def test_runs_ended_by_other_processes_reach_the_callback_and_a_failing_callback_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended: list[str] = []
    listener = EventListener(
        "postgresql+asyncpg://nobody@127.0.0.1/none", EventBus(), None, Metrics(), on_run_ended=ended.append
    )  # type: ignore[arg-type]
    notify = listener._on_run_ended_notify
    notify(None, 0, RUNS_ENDED_CHANNEL, "other-process|run-1")
    notify(None, 0, RUNS_ENDED_CHANNEL, f"{PROCESS_ID}|run-2")  # this process ended it: its executor knows
    assert ended == ["run-1"]

    def failing(run_id: str) -> None:
        raise RuntimeError("boom")

    listener._on_run_ended = failing
    with caplog.at_level(logging.WARNING):
        notify(None, 0, RUNS_ENDED_CHANNEL, "other-process|run-3")  # logged, not raised
    assert "run-3" in caplog.text and "boom" in caplog.text


def test_the_relayed_positions_are_bounded_least_recently_relayed_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Positions of runs that never ended here (their watchers left, no notification followed) were kept
    for good; at most REMEMBERED_RELAYS are kept now (a forgotten one costs its watchers a read)."""
    monkeypatch.setattr(listener_module, "REMEMBERED_RELAYS", 3)
    listener = EventListener("postgresql+asyncpg://nobody@127.0.0.1/none", EventBus(), None, Metrics())  # type: ignore[arg-type]
    for run_id in ("a", "b", "c"):
        listener._remember_relayed(run_id, 1)
    listener._remember_relayed("a", 2)  # relayed again: now the most recent
    listener._remember_relayed("d", 1)
    assert listener._relayed == {"c": 1, "a": 2, "d": 1}


def test_a_runs_relayed_position_is_forgotten_when_its_last_watcher_here_leaves() -> None:
    """A position set from a notification that was already the run's last (its watchers read for
    themselves) stayed until the bound pushed it out; the last watcher's leaving drops it."""
    bus = EventBus()
    listener = EventListener("postgresql+asyncpg://nobody@127.0.0.1/none", bus, None, Metrics())  # type: ignore[arg-type]
    with bus.subscribe("run-1", 8), bus.subscribe("run-1", 8):
        listener._remember_relayed("run-1", 7)
    assert listener._relayed == {}


class _DroppedConnection:
    """A database whose connection was just dropped (pg_terminate_backend, a restart): every read fails."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        raise self.error
        yield


@pytest.mark.parametrize(
    ("error", "traceback"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), False),
        (RuntimeError("a bug of ours"), True),
    ],
)
async def test_a_relay_the_database_cannot_answer_is_one_warning_and_the_watchers_read_for_themselves(
    caplog: pytest.LogCaptureFixture, error: BaseException, traceback: bool
) -> None:
    """Each connection a probe dropped under a replica (120 in all) left a traceback at ERROR here, beside
    the supervised loops' one line each for the same cause; nothing was lost (watchers read the log)."""
    bus = EventBus()
    listener = EventListener("postgresql+asyncpg://nobody@127.0.0.1/none", bus, _DroppedConnection(error), Metrics())  # type: ignore[arg-type]
    listener._remember_relayed("run-1", 3)
    listener._notified["run-1"] = 5
    with bus.subscribe("run-1", 8) as watcher, caplog.at_level(logging.WARNING):
        await listener._relay("run-1")
        assert await watcher.next(timeout=1) is None  # told to read the database for itself
    [record] = [r for r in caplog.records if "run-1" in r.getMessage()]
    assert (record.levelno, record.exc_info is not None) == (
        (logging.ERROR, True) if traceback else (logging.WARNING, False)
    )
