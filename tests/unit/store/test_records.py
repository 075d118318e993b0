"""The store's records read every column of their table, and its tuple builders match their column
order: a column added to a model without its record (or the other way round), or a builder that
drifts from its columns, fails here, not on the first write or read of a row in production."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
from sqlmodel import SQLModel

from evalsvc.store import datasets, runs, secrets, webhooks
from evalsvc.store.jobs import CLAIMED_COLUMNS, OUTPUT_COLUMNS, ClaimedJob, output_tuple
from evalsvc.store.models import (
    ApiKeyRow,
    DatasetAppendRow,
    DatasetGenerationRow,
    DatasetRow,
    ResultRow,
    RunRow,
    SavedGraderRow,
    SavedGraderVersionRow,
    SavedTargetRow,
    TenantSecretRow,
    WebhookDeliveryRow,
    WebhookRow,
)
from evalsvc.store.records import (
    ApiKeyRecord,
    ClaimableGeneration,
    ClaimedDelivery,
    DatasetAppendRecord,
    DatasetGenerationRecord,
    DatasetRecord,
    GraderTally,
    GraderVersionRecord,
    ResultRecord,
    RunListing,
    RunRecord,
    SavedGraderRecord,
    SavedTargetRecord,
    SecretName,
    TenantSecretRecord,
    WebhookDeliveryRecord,
    WebhookRecord,
)
from evalsvc.store.runs import RESULT_COLUMNS, result_tuple

FULL_RECORDS: list[tuple[type[Any], type[SQLModel]]] = [
    (RunRecord, RunRow),
    (ResultRecord, ResultRow),
    (SavedGraderRecord, SavedGraderRow),
    (GraderVersionRecord, SavedGraderVersionRow),
    (SavedTargetRecord, SavedTargetRow),
    (DatasetRecord, DatasetRow),
    (DatasetAppendRecord, DatasetAppendRow),
    (DatasetGenerationRecord, DatasetGenerationRow),
    (ApiKeyRecord, ApiKeyRow),
    (TenantSecretRecord, TenantSecretRow),
    (WebhookRecord, WebhookRow),
    (WebhookDeliveryRecord, WebhookDeliveryRow),
]


@pytest.mark.parametrize(("record", "model"), FULL_RECORDS, ids=[record.__name__ for record, _ in FULL_RECORDS])
def test_a_record_has_every_column_of_its_table_in_table_order(record: type[Any], model: type[SQLModel]) -> None:
    table = model.__table__  # type: ignore[attr-defined]
    assert [field.name for field in fields(record)] == [column.name for column in table.columns]


def test_a_partial_record_is_read_from_the_columns_of_its_fields() -> None:
    """Records of queries that read some columns: their queries select exactly those, in field order."""
    for record, columns in [
        (ClaimedJob, CLAIMED_COLUMNS),
        (ClaimableGeneration, datasets.CLAIMABLE_COLUMNS),
        (ClaimedDelivery, webhooks.CLAIMED_COLUMNS),
        (SecretName, secrets.NAME_COLUMNS),
        (GraderTally, runs.TALLY_COLUMNS),
    ]:
        assert [column.name for column in columns] == [field.name for field in fields(record)], record.__name__


def test_a_run_listing_is_the_run_columns_but_the_definition_and_annotations_in_table_order() -> None:
    """RUN_VIEW_BASIC reads RunListing's columns: every one a column of `runs`, in its order, and none of the
    heavy ones (a listing read the definitions of up to 1,001 runs to show their names)."""
    columns = [column.name for column in RunRow.__table__.columns]  # type: ignore[attr-defined]
    listed = [field.name for field in fields(RunListing)]
    assert listed == [name for name in columns if name in listed]
    assert set(columns) - set(listed) == {"tenant", "request_hash", "spec", "annotations", "stored_bytes"}


def test_the_tuple_builders_put_each_value_in_its_columns_place() -> None:
    """Each builder called with every column's own name as its value returns the column order itself."""
    assert result_tuple(**{column: column for column in RESULT_COLUMNS}) == RESULT_COLUMNS
    assert output_tuple(**{column: column for column in OUTPUT_COLUMNS}) == OUTPUT_COLUMNS
