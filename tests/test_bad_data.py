"""Bad data stays with its evaluation: text is checked at the edge the same on SQLite and PostgreSQL
(run these with EVALSVC_TEST_DB=postgres too), and what targets return is always recorded."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    run_pb2,
    target_pb2,
    target_service_pb2,
    target_service_pb2_grpc,
)
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests.helpers import create_request, error_reason, exact, violations, watch_all

NUL_VIOLATION = "must not contain NUL (U+0000) characters"


def assert_nul_refused(error: pytest.ExceptionInfo[grpc.aio.AioRpcError], *fields: str) -> None:
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "INVALID_ARGUMENT"
    named = violations(error.value)
    assert set(named) == set(fields), named
    assert all(NUL_VIOLATION in description for description in named.values())


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"display_name": "before\x00after"}, ["display_name"]),
        ({"request_id": "r\x00"}, ["request_id"]),
        ({"labels": {"team": "a\x00"}}, ["labels[team]"]),
        ({"annotations": {"k\x00": "v"}}, ["annotations[k\\u0000]"]),
        ({"graders": [grader_pb2.Grader(name="exact\x00", exact_match=grader_pb2.ExactMatch())]}, ["graders[0].name"]),
        (
            {"items": [item_pb2.Item(id="a\x00", input="q"), item_pb2.Item(id="b", metadata={"m": "\x00"})]},
            ["items[0].id", "items[1].metadata[m]"],
        ),
    ],
)
async def test_a_nul_in_any_string_of_create_run_is_invalid_argument_naming_the_field(runs, fields, named) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.CreateRun(create_request(2, **fields))
    assert_nul_refused(refused, *named)
    assert not (await runs.ListRuns(pb.ListRunsRequest())).runs  # nothing half-written


async def test_a_nul_in_an_id_is_invalid_argument_not_a_lookup(runs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.GetRun(pb.GetRunRequest(run_id="run_\x00"))
    assert_nul_refused(refused, "run_id")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_all(runs, "run_\x00")
    assert_nul_refused(refused, "run_id")


async def test_update_run_refuses_a_nul_and_keeps_the_run_as_it_was(runs) -> None:
    run = (await runs.CreateRun(create_request(1, display_name="kept"))).run
    update = pb.UpdateRunRequest(
        run_id=run.id,
        run=run_pb2.Run(display_name="x\x00", labels={"team": "ok"}),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "labels"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.UpdateRun(update)
    assert_nul_refused(refused, "run.display_name")
    current = (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run
    assert current.display_name == "kept" and not current.labels


async def test_datasets_graders_and_targets_refuse_a_nul_too(channel) -> None:
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="d")))).dataset
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await datasets.AddDatasetItems(
            ds.AddDatasetItemsRequest(
                dataset_id=dataset.id, items=[item_pb2.Item(id="ok"), item_pb2.Item(input="\x00")]
            )
        )
    assert_nul_refused(refused, "items[1].input")
    assert not (await datasets.ListDatasetItems(ds.ListDatasetItemsRequest(dataset_id=dataset.id))).items

    graders = grader_service_pb2_grpc.GraderServiceStub(channel)
    saved = grader_service_pb2.SavedGrader(
        display_name="g", grader=grader_pb2.Grader(contains=grader_pb2.Contains(values=["fine", "no\x00"]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await graders.CreateGrader(grader_service_pb2.CreateGraderRequest(grader=saved))
    assert_nul_refused(refused, "grader.grader.contains.values[1]")

    targets = target_service_pb2_grpc.TargetServiceStub(channel)
    chat = target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url="https://example.com/v1"), model="m\x00")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await targets.CreateTarget(
            target_service_pb2.CreateTargetRequest(
                target=target_service_pb2.SavedTarget(target=target_pb2.Target(chat=chat))
            )
        )
    assert_nul_refused(refused, "target.target.chat.model")


async def test_text_without_nul_is_stored_exactly_on_either_engine(runs) -> None:
    """The check refuses NUL only: other control characters and astral-plane text go through as sent."""
    text = "tab\tbell\x07 \U0001f600 \U0010ffff"
    run = (await runs.CreateRun(create_request(1, display_name=text, graders=[exact()]))).run
    assert (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run.display_name == text
