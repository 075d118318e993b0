"""UpdateRun, DeleteRun/UndeleteRun (soft delete, AIP-164) and annotations (AIP-128), over a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from evalsvc.messages.validation import MAX_MASK_KEYS
from evalsvc.runs.service import UPDATABLE
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import run_pb2
from tests.helpers import create_request, error_reason, violations, watch_all


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


async def test_update_run_with_the_full_mask_replaces_every_updatable_field(runs) -> None:
    """AIP-134's `*`: every updatable field takes the request's value, and one the request leaves unset is
    cleared (it was INVALID_ARGUMENT "'*' cannot be updated")."""
    run = (await runs.CreateRun(create_request(2, display_name="old", description="d", labels={"team": "a"}))).run
    replaced = (
        await runs.UpdateRun(
            pb.UpdateRunRequest(
                run_id=run.id,
                run=run_pb2.Run(display_name="new", annotations={"k": "v"}),
                update_mask=field_mask_pb2.FieldMask(paths=["*"]),
            )
        )
    ).run
    assert (replaced.display_name, replaced.description) == ("new", "")
    assert (dict(replaced.labels), dict(replaced.annotations)) == ({}, {"k": "v"})
    assert await _listed(runs, labels={"team": "a"}) == []  # the label index follows
    with pytest.raises(grpc.aio.AioRpcError) as mixed:  # `*` stands alone (`*,annotations.k` was taken as `*`)
        await runs.UpdateRun(
            pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(), update_mask=_mask("*", "annotations.k"))
        )
    assert mixed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in violations(mixed.value)
    assert (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run.display_name == "new"  # nothing cleared


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
    again_restored = (await runs.UndeleteRun(pb.UndeleteRunRequest(run_id=gone.id))).run
    assert not again_restored.HasField("delete_time")
    assert again_restored.etag == restored.etag  # nothing changed: other clients' etags stay good
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.DeleteRun(pb.DeleteRunRequest(run_id="run_nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.UndeleteRun(pb.UndeleteRunRequest(run_id="run_nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def _get(runs, run_id: str) -> run_pb2.Run:  # type: ignore[no-untyped-def]
    return (await runs.GetRun(pb.GetRunRequest(run_id=run_id))).run


async def test_the_etag_changes_with_every_change_of_the_run(runs) -> None:
    created = (await runs.CreateRun(create_request(3))).run
    seen = [created.etag]
    await watch_all(runs, created.id)  # status and counters move as the run executes
    seen.append((await _get(runs, created.id)).etag)
    changes = [
        pb.UpdateRunRequest(run_id=created.id, run=run_pb2.Run(display_name="renamed")),
        pb.UpdateRunRequest(run_id=created.id, run=run_pb2.Run(labels={"team": "a"})),
        pb.UpdateRunRequest(
            run_id=created.id, run=run_pb2.Run(annotations={"a": "1"}), update_mask=_mask("annotations.a")
        ),
    ]
    for change in changes:
        seen.append((await runs.UpdateRun(change)).run.etag)
        assert (await _get(runs, created.id)).etag == seen[-1]  # reads (and the run cache) follow
    seen.append((await runs.DeleteRun(pb.DeleteRunRequest(run_id=created.id))).run.etag)
    seen.append((await runs.UndeleteRun(pb.UndeleteRunRequest(run_id=created.id))).run.etag)
    assert all(seen) and len(set(seen)) == len(seen), seen
    listed = (await runs.ListRuns(pb.ListRunsRequest())).runs
    assert [r.etag for r in listed] == [seen[-1]]


async def test_update_run_with_a_stale_etag_is_aborted_and_writes_nothing(runs) -> None:
    run = (await runs.CreateRun(create_request(2, display_name="first"))).run
    await watch_all(runs, run.id)
    read = await _get(runs, run.id)
    newer = (
        await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(display_name="second", etag=read.etag)))
    ).run
    assert newer.display_name == "second" and newer.etag != read.etag
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(display_name="lost", etag=read.etag)))
    assert stale.value.code() == grpc.StatusCode.ABORTED and error_reason(stale.value) == "ETAG_MISMATCH"
    assert await _get(runs, run.id) == newer
    with pytest.raises(grpc.aio.AioRpcError) as forged:
        await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(display_name="x", etag='W/"1"')))
    assert forged.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "run.etag" in violations(forged.value)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await runs.UpdateRun(pb.UpdateRunRequest(run_id="run_nope", run=run_pb2.Run(display_name="x", etag="1")))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_run_with_a_stale_etag_neither_cancels_nor_deletes(runs) -> None:
    active = (await runs.CreateRun(create_request(3000))).run  # far too many to finish before the next calls
    await runs.UpdateRun(pb.UpdateRunRequest(run_id=active.id, run=run_pb2.Run(display_name="x")))
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await runs.DeleteRun(pb.DeleteRunRequest(run_id=active.id, etag=active.etag))
    assert stale.value.code() == grpc.StatusCode.ABORTED and error_reason(stale.value) == "ETAG_MISMATCH"
    after = await _get(runs, active.id)
    assert not after.HasField("delete_time") and after.status != run_pb2.RUN_STATUS_CANCELLED
    await runs.CancelRun(pb.CancelRunRequest(run_id=active.id))

    ended = (await runs.CreateRun(create_request(2))).run
    await watch_all(runs, ended.id)
    read = await _get(runs, ended.id)
    deleted = (await runs.DeleteRun(pb.DeleteRunRequest(run_id=ended.id, etag=read.etag))).run
    assert deleted.HasField("delete_time") and deleted.etag != read.etag
    with pytest.raises(grpc.aio.AioRpcError) as again:  # the etag read before the delete is stale now
        await runs.DeleteRun(pb.DeleteRunRequest(run_id=ended.id, etag=read.etag))
    assert again.value.code() == grpc.StatusCode.ABORTED
    assert (await runs.DeleteRun(pb.DeleteRunRequest(run_id=ended.id, etag=deleted.etag))).run == deleted


async def test_an_update_mask_names_at_most_the_fields_and_a_bounded_number_of_map_keys(runs) -> None:
    """Probe: UpdateRun with 600,000 `annotations.kN` paths held the event loop over a second and was
    accepted. A mask of more than the updatable fields and MAX_MASK_KEYS map keys is INVALID_ARGUMENT
    naming `update_mask`, counted before any path is read, and the run is unchanged; at the bound, taken."""
    run = (await runs.CreateRun(create_request(1, annotations={"keep": "1"}))).run
    keys = [f"annotations.k{i}" for i in range(MAX_MASK_KEYS + len(UPDATABLE) - 1)]  # and display_name: the bound
    wanted = run_pb2.Run(display_name="renamed", annotations={"k0": "v"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.UpdateRun(
            pb.UpdateRunRequest(
                run_id=run.id, run=wanted, update_mask=_mask("display_name", *keys, "annotations.one-more")
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and list(violations(refused.value)) == [
        "update_mask"
    ]
    unchanged = await _get(runs, run.id)
    assert (unchanged.display_name, dict(unchanged.annotations)) == ("", {"keep": "1"})
    taken = await runs.UpdateRun(
        pb.UpdateRunRequest(run_id=run.id, run=wanted, update_mask=_mask("display_name", *keys))
    )
    assert (taken.run.display_name, dict(taken.run.annotations)) == ("renamed", {"keep": "1", "k0": "v"})


@pytest.mark.parametrize(
    "path", ["labels.", "labels.a.b", "labels.`", "annotations.`a", "annotations.`a`b`", "annotations.``", "labels.a-b"]
)
async def test_a_map_key_path_that_is_malformed_is_refused_and_changes_nothing(runs, path: str) -> None:
    """Probe: gRPC took `labels.`, `labels.a.b` or an unterminated backtick as a literal key and answered OK
    with a new etag, where REST answered 400. A key after the dot is an identifier or backtick-quoted
    (AIP-161); anything else is INVALID_ARGUMENT naming update_mask, and the run is as it was."""
    created = (await runs.CreateRun(create_request(1, labels={"team": "a"}, annotations={"keep": "1"}))).run
    await watch_all(runs, created.id)  # ended: its etag moves no more
    run = await _get(runs, created.id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=run_pb2.Run(), update_mask=_mask(path)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(refused.value)) == ["update_mask"]
    unchanged = await _get(runs, run.id)
    assert (unchanged.etag, dict(unchanged.labels), dict(unchanged.annotations)) == (
        run.etag,
        {"team": "a"},
        {"keep": "1"},
    )


async def test_a_quoted_map_key_may_hold_dots_and_doubled_backticks(runs) -> None:
    run = (await runs.CreateRun(create_request(1, labels={"team-a": "x"}))).run
    wanted = run_pb2.Run(annotations={"a.b": "1", "c`d": "2"})
    changed = await runs.UpdateRun(
        pb.UpdateRunRequest(
            run_id=run.id, run=wanted, update_mask=_mask("annotations.`a.b`", "annotations.`c``d`", "labels.`team-a`")
        )
    )
    assert dict(changed.run.annotations) == {"a.b": "1", "c`d": "2"} and dict(changed.run.labels) == {}


async def test_map_key_masks_change_one_key_and_concurrent_writers_lose_nothing(runs) -> None:
    run = (await runs.CreateRun(create_request(2, annotations={"keep": "1", "drop": "2"}, labels={"team": "a"}))).run
    changed = (
        await runs.UpdateRun(
            pb.UpdateRunRequest(
                run_id=run.id,
                run=run_pb2.Run(annotations={"vendor.summary": "s"}, labels={"env": "ci"}),
                update_mask=_mask("annotations.`vendor.summary`", "annotations.drop", "labels.env"),
            )
        )
    ).run
    assert dict(changed.annotations) == {"keep": "1", "vendor.summary": "s"}  # drop: not in run, so removed
    assert dict(changed.labels) == {"team": "a", "env": "ci"}
    assert await _listed(runs, labels={"env": "ci"}) == [run.id]
    with pytest.raises(grpc.aio.AioRpcError) as bad_key:
        await runs.UpdateRun(
            pb.UpdateRunRequest(
                run_id=run.id, run=run_pb2.Run(labels={"Bad Key": "v"}), update_mask=_mask("labels.`Bad Key`")
            )
        )
    assert bad_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "run.labels[Bad Key]" in violations(
        bad_key.value
    )
    half = run_pb2.Run(annotations={"half": "v" * 40_000})
    await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=half, update_mask=_mask("annotations.half")))
    other = run_pb2.Run(annotations={"other": "v" * 40_000})
    with pytest.raises(grpc.aio.AioRpcError) as too_big:  # each key fits alone; with the stored one, not
        await runs.UpdateRun(pb.UpdateRunRequest(run_id=run.id, run=other, update_mask=_mask("annotations.other")))
    assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "run.annotations" in violations(too_big.value)
    assert "other" not in (await _get(runs, run.id)).annotations

    writers = 20
    await asyncio.gather(
        *(
            runs.UpdateRun(
                pb.UpdateRunRequest(
                    run_id=run.id,
                    run=run_pb2.Run(annotations={f"k{i}": str(i)}),
                    update_mask=_mask(f"annotations.k{i}"),
                )
            )
            for i in range(writers)
        )
    )
    final = await _get(runs, run.id)
    assert {f"k{i}" for i in range(writers)} <= set(final.annotations) and final.annotations["keep"] == "1"
