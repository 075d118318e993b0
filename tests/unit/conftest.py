"""Fixtures of the unit tests: a bare database at the newest schema, with no server in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from evalsvc.store.db import Database
from tests import dbs


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database of this test's own: a SQLite file, or a PostgreSQL clone with
    `EVALSVC_TEST_DB=postgres` (tests/dbs.py), so the store's SQL is checked on both engines.
    tests/unit/store/test_writer.py defines its own, with a bare table instead of the schema."""
    database = Database(dbs.db_url(tmp_path), pool_size=2)
    yield database
    await database.close()
