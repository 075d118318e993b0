"""ListRuns for everyday use over a real server (SQLite, or PostgreSQL with EVALSVC_TEST_DB=postgres): `filter`
(a subset of AIP-160), `order_by` with keyset pages both ways, and RUN_VIEW_BASIC."""

from __future__ import annotations

import grpc
import pytest

from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests.helpers import create_request, error_reason, violations, watch_all

Stub = eval_run_service_pb2_grpc.EvalRunServiceStub


async def _ended(runs: Stub, request: pb.CreateRunRequest) -> run_pb2.Run:
    """A run created from `request` and watched to its end, as GetRun then reads it."""
    created = (await runs.CreateRun(request)).run
    await watch_all(runs, created.id)
    return (await runs.GetRun(pb.GetRunRequest(run_id=created.id))).run


async def _listed(runs: Stub, **fields: object) -> list[str]:
    """The ids of every run ListRuns lists with these fields, page after page."""
    request = pb.ListRunsRequest(**fields)  # type: ignore[arg-type]
    ids: list[str] = []
    while True:
        page = await runs.ListRuns(request)
        ids.extend(run.id for run in page.runs)
        if not page.next_page_token:
            return ids
        request.page_token = page.next_page_token


@pytest.fixture
async def four(runs: Stub) -> list[run_pb2.Run]:
    """Four ended runs, oldest first: a passing nightly, a failing one named with LIKE's wildcards, a FAILED
    one (every evaluation errored), and an unlabelled passing one."""
    wrong = create_request(2, display_name="Nightly_50%", labels={"team": "ads"})
    wrong.items[0].response.content = "wrong"
    errored = create_request(1, display_name="broken", labels={"team": "search", "tier": "gold"})
    errored.items[0].ClearField("response")
    return [
        await _ended(runs, create_request(2, display_name="nightly-2026-01", labels={"team": "search"})),
        await _ended(runs, wrong),
        await _ended(runs, errored),
        await _ended(runs, create_request(1, display_name="adhoc")),
    ]


async def test_a_filter_selects_runs_by_name_labels_status_verdict_and_time(
    runs: Stub, four: list[run_pb2.Run]
) -> None:
    nightly, wrong, broken, adhoc = (run.id for run in four)
    first, second, _, last = (run.create_time.ToJsonString() for run in four)
    assert (four[1].overall_passed, four[2].status) == (False, run_pb2.RUN_STATUS_FAILED)
    cases = {
        'display_name:"NIGHTLY"': [wrong, nightly],  # case-insensitive substring
        'display_name:"y_"': [wrong],  # `_` is itself, not LIKE's any character ("y-" of the other)
        "display_name:%": [wrong],
        'display_name = "adhoc"': [adhoc],
        "display_name = adho": [],  # `=` is the whole name
        'labels.team = "search"': [broken, nightly],
        "labels.tier:*": [broken],
        "labels.team:* AND labels.team = ads": [wrong],
        "status = RUN_STATUS_FAILED": [broken],
        "overall_passed = false": [wrong],
        "overall_passed = true": [adhoc, nightly],  # a FAILED run has no verdict
        f'create_time >= "{second}"': [adhoc, broken, wrong],
        f'create_time < "{second}"': [nightly],
        f'create_time > "{first}"': [adhoc, broken, wrong],  # T shown: exact
        f'create_time <= "{first}"': [nightly],
        f'create_time >= "{second}" AND create_time < "{last}" AND labels.team = "search"': [broken],
        'end_time > "2000-01-01T00:00:00+02:00"': [adhoc, broken, wrong, nightly],
        'end_time < "2000-01-01T00:00:00Z"': [],
        'dataset_id = "ds_none"': [],
        "": [adhoc, broken, wrong, nightly],
    }
    for text, expected in cases.items():
        assert await _listed(runs, filter=text) == expected, text
    # The older fields and the filter must all match.
    both = await _listed(runs, filter="labels.team:*", statuses=[run_pb2.RUN_STATUS_SUCCEEDED], labels={"team": "ads"})
    assert both == [wrong]


async def test_runs_are_listed_oldest_first_on_request_and_pages_keep_each_order(
    runs: Stub, four: list[run_pb2.Run]
) -> None:
    """Keyset pages in both orders, one run a page, list every run once; a filter pages the same way."""
    oldest_first = [run.id for run in four]
    for order_by in ("create_time", " create_time   asc ", "create_time ASC"):
        assert await _listed(runs, order_by=order_by, page_size=1) == oldest_first, order_by
    for order_by in ("", "create_time desc"):
        assert await _listed(runs, order_by=order_by, page_size=1) == oldest_first[::-1], order_by
    named = await _listed(runs, filter='display_name:"n"', order_by="create_time", page_size=1)
    assert named == [four[0].id, four[1].id, four[2].id]


async def test_a_page_token_reads_on_only_with_the_filter_and_order_it_was_issued_for(
    runs: Stub, four: list[run_pb2.Run]
) -> None:
    first = await runs.ListRuns(pb.ListRunsRequest(page_size=1, filter="labels.team:*", order_by="create_time"))
    token = first.next_page_token
    for other in (
        pb.ListRunsRequest(page_token=token, filter="labels.team:*"),  # newest first
        pb.ListRunsRequest(page_token=token, order_by="create_time"),  # no filter
        pb.ListRunsRequest(page_token=token, filter="labels.tier:*", order_by="create_time"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runs.ListRuns(other)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "INVALID_PAGE_TOKEN"
    same = pb.ListRunsRequest(
        page_token=token, filter="labels.team:*", order_by="create_time", view=pb.RUN_VIEW_BASIC, page_size=5
    )
    assert [run.id for run in (await runs.ListRuns(same)).runs] == [four[1].id, four[2].id]  # the view may change


async def test_the_basic_view_leaves_the_definition_and_annotations_out(runs: Stub) -> None:
    request = create_request(2, display_name="big", labels={"k": "v"}, annotations={"note": "x" * 1000})
    request.graders[0].name = "g" * 60
    run = await _ended(runs, request)
    (basic,) = (await runs.ListRuns(pb.ListRunsRequest(view=pb.RUN_VIEW_BASIC))).runs
    for view in (pb.RUN_VIEW_FULL, pb.RUN_VIEW_UNSPECIFIED):
        (full,) = (await runs.ListRuns(pb.ListRunsRequest(view=view))).runs
        assert full == run
    assert not basic.HasField("target") and not basic.graders and not basic.annotations
    assert basic.ByteSize() < run.ByteSize() - 1000
    expected = run_pb2.Run()
    expected.CopyFrom(run)
    for name in ("target", "graders", "annotations", "repetitions", "trigger", "max_error_rate", "cache_mode"):
        expected.ClearField(name)
    assert basic == expected  # names, labels, status, counts, aggregate, verdict, times, etag: as GetRun's
    assert basic.aggregate.graders[0].grader == "g" * 60 and basic.counts.passed == 2


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"filter": "display_name = a OR display_name = b"}, "filter", "at character 18: OR is not supported"),
        ({"filter": "NOT status = RUN_STATUS_FAILED"}, "filter", "at character 1: NOT is not supported"),
        ({"filter": "(status = RUN_STATUS_FAILED)"}, "filter", "parentheses are not supported"),
        ({"filter": "name = a"}, "filter", "at character 1: expected a field (create_time, end_time"),
        ({"filter": "status = FAILED"}, "filter", "at character 10: expected a run status (RUN_STATUS_PENDING"),
        ({"filter": "create_time > 2026-01-01"}, "filter", "at character 15: expected an RFC 3339 time in double"),
        ({"filter": 'create_time > "2026-01-01"'}, "filter", "expected an RFC 3339 time"),
        ({"filter": 'create_time = "2026-01-01T00:00:00Z"'}, "filter", "at character 13: expected < or <= or >"),
        ({"filter": 'display_name:"open'}, "filter", "at character 14: the string is not closed"),
        ({"filter": "overall_passed = yes"}, "filter", "at character 18: expected true or false"),
        ({"filter": "labels.Team = a"}, "filter", "a label key must match"),
        ({"filter": "labels.team:a"}, "filter", "expected * (labels.KEY:* has the label"),
        ({"filter": "display_name = a display_name = b"}, "filter", "at character 18: expected AND or the end"),
        ({"filter": "display_name = a AND"}, "filter", "found the end of the filter"),
        ({"filter": " AND ".join(["labels.a:*"] * 21)}, "filter", "at most 20 terms"),
        ({"filter": 'display_name = "' + "x" * 2048 + '"'}, "filter", "at most 2048 characters (got 2065)"),
        ({"order_by": "display_name"}, "order_by", 'expected "create_time desc"'),
        ({"order_by": "create_time desc, id"}, "order_by", 'expected "create_time desc"'),
        ({"view": 7}, "view", "unknown view"),
    ],
)
async def test_a_filter_order_or_view_it_cannot_take_is_refused_saying_where_and_what(
    runs: Stub, fields: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.ListRuns(pb.ListRunsRequest(**fields))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_ARGUMENT"
    assert says in violations(caught.value)[field], violations(caught.value)


async def test_a_page_token_of_the_version_before_order_by_reads_its_next_page(
    server: EvalServer, runs: Stub, four: list[run_pb2.Run]
) -> None:
    """Tokens issued before ListRuns had order_by held the last run's id alone (the list was by id): one
    held by a client across an upgrade reads on from that run, newest first, rather than failing its listing."""
    query = {"statuses": [], "labels": {}, "dataset_id": "", "show_deleted": False}
    token = server.page_tokens.encode("default", "runs", query, four[2].id)
    page = await runs.ListRuns(pb.ListRunsRequest(page_token=token))
    assert [run.id for run in page.runs] == [four[1].id, four[0].id]
