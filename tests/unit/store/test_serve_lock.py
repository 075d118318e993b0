"""The serve lock of a SQLite file (evalsvc/store/serve_lock.py): one holder at a time, whichever path
names the file; the holder's pid for the message; free again once released. (Real processes, kill -9
included: tests/test_startup.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evalsvc.store.serve_lock import MIGRATING, DatabaseInUse, ServeLock


def test_one_holder_at_a_time_named_by_its_pid_and_free_again_after_release(tmp_path: Path) -> None:
    database = tmp_path / "evalsvc.db"
    held = ServeLock(database)
    held.acquire()
    assert held.held and held.path == tmp_path / "evalsvc.db.serve.lock"
    assert held.path.read_text() == f"{os.getpid()} serving\n"
    with pytest.raises(DatabaseInUse) as refused:
        ServeLock(database).acquire()
    assert refused.value.pid == os.getpid() and refused.value.lock_file == held.path
    assert str(refused.value) == f"another evalsvc server (pid {os.getpid()}) serves it"
    held.release()
    assert not held.held and held.path.read_text() == ""  # the file stays, without a pid
    again = ServeLock(database)
    again.acquire()
    again.release()


def test_every_path_to_the_file_names_the_same_lock(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    database = tmp_path / "data" / "evalsvc.db"
    database.touch()
    (tmp_path / "link.db").symlink_to(database)
    held = ServeLock(database)
    held.acquire()
    try:
        for other in (tmp_path / "link.db", tmp_path / "data" / ".." / "data" / "evalsvc.db"):
            with pytest.raises(DatabaseInUse):
                ServeLock(other).acquire()
    finally:
        held.release()


def test_a_holder_that_has_not_written_its_pid_yet_is_named_without_one(tmp_path: Path) -> None:
    held = ServeLock(tmp_path / "evalsvc.db")
    held.acquire()
    try:
        held.path.write_text("")
        with pytest.raises(DatabaseInUse) as refused:
            ServeLock(tmp_path / "evalsvc.db").acquire()
        assert refused.value.pid is None and str(refused.value) == "another evalsvc server serves it"
    finally:
        held.release()


def test_a_migrating_command_is_named_as_one(tmp_path: Path) -> None:
    """An operator command takes the lock while it migrates the file (evalsvc.store.migrate): a server
    starting meanwhile, or another migration, was told that "another evalsvc server" served it."""
    held = ServeLock(tmp_path / "evalsvc.db", MIGRATING)
    held.acquire()
    try:
        with pytest.raises(DatabaseInUse) as refused:
            ServeLock(tmp_path / "evalsvc.db").acquire()
        assert refused.value.doing == MIGRATING
        assert str(refused.value) == f"an evalsvc command (pid {os.getpid()}) is migrating it"
    finally:
        held.release()
