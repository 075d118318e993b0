"""The store's records read every column of their table, and its tuple builders match their column
order: a column added to a model without its record (or the other way round), or a builder that
drifts from its columns, fails here, not on the first write or read of a row in production."""

from __future__ import annotations

from dataclasses import fields

from evalsvc.store.jobs import CLAIMED_COLUMNS, OUTPUT_COLUMNS, ClaimedJob, output_tuple
from evalsvc.store.models import RunRow
from evalsvc.store.records import RunRecord
from evalsvc.store.runs import RESULT_COLUMNS, result_tuple


def test_a_run_record_has_every_column_of_runs_in_table_order() -> None:
    table = RunRow.__table__  # type: ignore[attr-defined]
    assert [field.name for field in fields(RunRecord)] == [column.name for column in table.columns]


def test_a_claimed_job_is_read_from_the_jobs_columns_of_its_fields() -> None:
    assert [column.name for column in CLAIMED_COLUMNS] == [field.name for field in fields(ClaimedJob)]


def test_the_tuple_builders_put_each_value_in_its_columns_place() -> None:
    """Each builder called with every column's own name as its value returns the column order itself."""
    assert result_tuple(**{column: column for column in RESULT_COLUMNS}) == RESULT_COLUMNS
    assert output_tuple(**{column: column for column in OUTPUT_COLUMNS}) == OUTPUT_COLUMNS
