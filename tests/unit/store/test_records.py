"""The store's records read every column of their table: a column added to a model without its record
(or the other way round) fails here, not on the first read of a row in production."""

from __future__ import annotations

from dataclasses import fields

from evalsvc.store.models import RunRow
from evalsvc.store.records import RunRecord


def test_a_run_record_has_every_column_of_runs_in_table_order() -> None:
    table = RunRow.__table__  # type: ignore[attr-defined]
    assert [field.name for field in fields(RunRecord)] == [column.name for column in table.columns]
