"""UpdateRun, DeleteRun/UndeleteRun (soft delete, AIP-164) and annotations (AIP-128), over a real server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import run_pb2
from tests.helpers import create_request, violations, watch_all


async def _listed(runs, **filters: object) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.id for r in (await runs.ListRuns(pb.ListRunsRequest(**filters))).runs]


async def test_annotations_are_stored_and_returned_but_bounded(runs, datasets) -> None:
    note = {"vendor.field/With Caps": "x" * 2000}
    created = (await runs.CreateRun(create_request(2, annotations=note))).run
    assert dict(created.annotations) == note
    assert dict((await runs.GetRun(pb.GetRunRequest(run_id=created.id))).run.annotations) == note
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(annotations=note)))).dataset
    assert dict((await datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id))).dataset.annotations) == note

    before = await _listed(runs)
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await runs.CreateRun(create_request(2, annotations={"k": "v" * (64 * 1024)}))
    assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "annotations" in violations(too_big.value)
    with pytest.raises(grpc.aio.AioRpcError) as long_key:
        await runs.CreateRun(create_request(2, annotations={"k" * 129: "v"}))
    assert long_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _listed(runs) == before  # nothing half-written


async def test_update_run_changes_only_the_masked_fields(runs) -> None:
    run = (await runs.CreateRun(create_request(2, display_name="old", description="d", labels={"team": "a"}))).run
    changed = (
        await runs.UpdateRun(
            pb.UpdateRunRequest(
                run_id=run.id,
                run=run_pb2.Run(display_name="new", description="ignored", labels={"team": "b"}),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name", "labels"]),
            )
        )
    ).run
    assert (changed.display_name, changed.description, dict(changed.labels)) == ("new", "d", {"team": "b"})
    assert await _listed(runs, labels={"team": "b"}) == [run.id]  # the label index follows
    assert await _listed(runs, labels={"team": "a"}) == []
    # An empty mask updates the fields that are set.
    noted = (await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(annotations={"a": "1"})))).run
    assert dict(noted.annotations) == {"a": "1"} and noted.display_name == "new"


async def test_update_run_rejects_unknown_paths_and_runs(runs) -> None:
    run = (await runs.CreateRun(create_request(2, display_name="keep"))).run
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await runs.UpdateRun(
            pb.UpdateRunRequest(
                run_id=run.id,
                run=run_pb2.Run(display_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name", "status"]),
            )
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in violations(bad.value)
    assert (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run.display_name == "keep"
    with pytest.raises(grpc.aio.AioRpcError) as nothing:
        await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run()))
    assert nothing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.UpdateRun(pb.UpdateRunRequest(run_id="run_nope", run=run_pb2.Run(display_name="x")))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_cancels_hides_and_undelete_restores(runs) -> None:
    kept = (await runs.CreateRun(create_request(2))).run
    gone = (await runs.CreateRun(create_request(3000))).run  # far too many to finish before the next call
    deleted = (await runs.DeleteRun(pb.DeleteRunRequest(run_id=gone.id))).run
    assert deleted.HasField("delete_time") and deleted.status == run_pb2.RUN_STATUS_CANCELLED
    events = await watch_all(runs, gone.id)  # a deleted run still streams to its end
    assert events[-1].run.status == deleted.status
    assert await _listed(runs) == [kept.id]
    assert await _listed(runs, show_deleted=True) == [gone.id, kept.id]
    assert (await runs.GetRun(pb.GetRunRequest(run_id=gone.id))).run.HasField("delete_time")
    again = (await runs.DeleteRun(pb.DeleteRunRequest(run_id=gone.id))).run  # idempotent
    assert again.delete_time == deleted.delete_time

    restored = (await runs.UndeleteRun(pb.UndeleteRunRequest(run_id=gone.id))).run
    assert not restored.HasField("delete_time") and restored.status == deleted.status
    assert await _listed(runs) == [gone.id, kept.id]
    assert not (await runs.UndeleteRun(pb.UndeleteRunRequest(run_id=gone.id))).run.HasField("delete_time")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.DeleteRun(pb.DeleteRunRequest(run_id="run_nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.UndeleteRun(pb.UndeleteRunRequest(run_id="run_nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
