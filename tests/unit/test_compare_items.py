"""ListComparisonItems (CompareService.list_items) over a bare database, on both engines: keyset pages
hold exactly what pairing both runs whole gave, for every filter, page size and byte bound, and read
only what the page needs."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import ServiceError
from evalsvc.ids import PageTokens
from evalsvc.runs.compare import CompareService, classify
from evalsvc.store import comparisons as comparison_store
from evalsvc.store import runs as run_store
from evalsvc.store.comparisons import Evaluation, Key
from evalsvc.store.db import Database
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import run_pb2
from tests.unit.stored import insert, new_run

GRADERS = ("exact", "similar", "Judge")
# Mixed case, punctuation, non-ASCII and astral item ids pin the order: code point order (Python's
# `str` order) on both engines. A locale would put "alpha" before "Zeta" and "item1" before
# "item-10"; UTF-16 order would put the emoji before "\ufb01".
ITEM_IDS = [
    "alpha", "Zeta", "zeta", "item-10", "item1", "item10", "item_2", "Ärger", "arger", "éclair", "eclair",
    "日本", "\ufb01le", "\U0001f600", "a b", "a", "A", "b~", "q005",
]  # fmt: skip
STATES = (
    run_pb2.RESULT_STATE_PASSED,
    run_pb2.RESULT_STATE_PASSED,
    run_pb2.RESULT_STATE_FAILED,
    run_pb2.RESULT_STATE_ERROR,
    run_pb2.RESULT_STATE_SKIPPED,
)
_ids = itertools.count(1)


def reference_page_keys(
    baseline: Sequence[Evaluation], candidate: Sequence[Evaluation], grader: str, change: int
) -> list[tuple[Key, int]]:
    """What ListComparisonItems listed when it paired both runs whole (the code before keyset paging):
    every key of either run matching the filters, in Python's order, with its change."""
    base = {(i, r, g): (s, sc) for i, r, g, s, sc, _ in baseline}
    cand = {(i, r, g): (s, sc) for i, r, g, s, sc, _ in candidate}
    keys = sorted(k for k in base.keys() | cand.keys() if not grader or k[2] == grader)
    paired = [(k, int(classify(base.get(k), cand.get(k)).change)) for k in keys]
    return [p for p in paired if not change or p[1] == change]


def result_row(run_id: str, key: Key, state: int, *, tenant: str = "t1", explanation: str = "") -> tuple[Any, ...]:
    job = next(_ids)
    return run_store.result_tuple(
        id=job * 1024, tenant=tenant, run_id=run_id, job_id=job, item_id=key[0], repetition=key[1], grader=key[2],
        state=state, score=1.0 if state == run_pb2.RESULT_STATE_PASSED else 0.25, raw_score=0.0,
        explanation=explanation or f"{key} in {run_id}", error_reason="", attempt=1, cost_usd=0.0, latency_ms=0.0,
        complete_time=1.0, scoring_cost_usd=0.0, confidence=None, cached=False, verdict_cached=False,
        human_verdict=None,
    )  # fmt: skip


async def record(db: Database, rows: list[tuple[Any, ...]]) -> None:
    async def work(conn: AsyncConnection) -> None:
        await run_store.insert_results(conn, rows)

    await db.transact(work)


async def two_runs(db: Database, seed: int) -> tuple[str, str, list[Evaluation], list[Evaluation]]:
    """A baseline and a candidate over mostly the same keys: several repetitions and graders, keys only
    in one run, every state on either side, some items with big explanations."""
    rng = random.Random(seed)
    baseline, candidate = new_run(graders=GRADERS), new_run(graders=GRADERS)
    await insert(db, baseline, candidate)
    b_id, c_id = baseline.row["id"], candidate.row["id"]
    evaluations: dict[str, list[Evaluation]] = {b_id: [], c_id: []}
    rows = []
    for key in itertools.product(ITEM_IDS, range(3), GRADERS):
        for run_id in (b_id, c_id):
            if rng.random() < 0.1:  # this key only in the other run (or in neither)
                continue
            state = rng.choice(STATES)
            big = "x" * 3000 if key[0] == "A" else ""
            rows.append(result_row(run_id, key, state, explanation=big))
            evaluations[run_id].append((*key, state, 0.0, rows[-1][0]))
    await record(db, rows)
    return b_id, c_id, evaluations[b_id], evaluations[c_id]


def service(db: Database, monkeypatch: pytest.MonkeyPatch, page_bytes: int = 8 << 20) -> CompareService:
    """The service, with pairing in a thread forbidden: ListComparisonItems must page without it (and
    without the pairing slot CompareRuns of every tenant take turns for)."""
    compare = CompareService(db, PageTokens(b"k" * 32, page_bytes=page_bytes))

    @contextlib.asynccontextmanager
    async def no_pairing(tenant: str) -> AsyncIterator[None]:  # the shape of CompareService._turn
        raise AssertionError("ListComparisonItems took the pairing turn")
        yield

    monkeypatch.setattr(compare, "_turn", no_pairing)
    return compare


async def page_through(
    compare: CompareService, b_id: str, c_id: str, grader: str, change: int, size: int
) -> list[cpb.ComparisonItem]:
    items: list[cpb.ComparisonItem] = []
    token = ""
    for _ in range(len(ITEM_IDS) * 3 * len(GRADERS) + 1):  # at least one item a page
        page, token = await compare.list_items(
            "t1",
            cpb.ListComparisonItemsRequest(
                baseline_run_id=b_id, candidate_run_id=c_id, grader=grader, change=change,  # type: ignore[arg-type]
                page_size=size, page_token=token,
            ),
        )  # fmt: skip
        assert page or not token, "an empty page with a next token"
        items.extend(page)
        if not token:
            return items
    raise AssertionError("paging did not end")


async def test_pages_hold_what_pairing_both_runs_whole_gave_for_every_filter(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    b_id, c_id, base, cand = await two_runs(db, seed=11)
    base_states = {e[:3]: e[3] for e in base}
    cand_states = {e[:3]: e[3] for e in cand}
    compare = service(db, monkeypatch)
    for grader, change in itertools.product(("", *GRADERS), cpb.ComparisonChange.values()):
        expected = reference_page_keys(base, cand, grader, change)
        for size in (1, 7, 1000) if not change else (3, 1000):
            items = await page_through(compare, b_id, c_id, grader, change, size)
            listed = [((i.item_id, i.repetition, i.grader), int(i.change)) for i in items]
            assert listed == expected, (grader, change, size)
        for item in items:
            key = (item.item_id, item.repetition, item.grader)
            assert item.HasField("baseline") == (key in base_states)
            assert item.HasField("candidate") == (key in cand_states)
            if key in base_states:
                assert item.baseline.state == base_states[key] and item.baseline.explanation
            if key in cand_states:
                assert item.candidate.state == cand_states[key]
    assert {change for _, change in reference_page_keys(base, cand, "", 0)} == set(cpb.ComparisonChange.values()) - {0}
    with pytest.raises(ServiceError) as err:  # another tenant's runs are not found
        await compare.list_items("t2", cpb.ListComparisonItemsRequest(baseline_run_id=b_id, candidate_run_id=c_id))
    assert err.value.code.name == "NOT_FOUND"


async def test_a_byte_bounded_page_resumes_right_after_its_last_item(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item "A" (the first in order) carries 3 KB explanations: with 8 KB pages, a page of 50 keys stops
    within its evaluations, and the next token resumes right after the last item returned."""
    b_id, c_id, base, cand = await two_runs(db, seed=12)
    compare = service(db, monkeypatch, page_bytes=8 * 1024)
    for grader, change in (("", 0), ("similar", 0), ("", cpb.COMPARISON_CHANGE_UNPAIRED)):
        items = await page_through(compare, b_id, c_id, grader, change, 50)
        assert [((i.item_id, i.repetition, i.grader), int(i.change)) for i in items] == reference_page_keys(
            base, cand, grader, change
        )
    first, token = await compare.list_items(
        "t1", cpb.ListComparisonItemsRequest(baseline_run_id=b_id, candidate_run_id=c_id, page_size=50)
    )
    assert token and len(first) < 50  # cut by bytes, not by count


async def test_a_page_reads_what_it_returns_not_the_runs(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a `change` filter a page reads at most page_size + 1 keys of each run, however large the
    runs (the old code read both runs whole for every page)."""
    b_id, c_id, _, _ = await two_runs(db, seed=13)
    read: list[int] = []
    real = comparison_store.evaluations_after

    async def counted(*args: Any) -> list[Evaluation]:
        rows = await real(*args)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(comparison_store, "evaluations_after", counted)
    compare = service(db, monkeypatch)
    token = ""
    for _ in range(3):
        read.clear()
        page, token = await compare.list_items(
            "t1",
            cpb.ListComparisonItemsRequest(baseline_run_id=b_id, candidate_run_id=c_id, page_size=10, page_token=token),
        )
        assert len(page) == 10 and token
        assert len(read) == 2 and max(read) <= 11, read


async def test_keys_recorded_later_appear_and_a_token_stays_valid(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run still running: results recorded after a page was listed appear on later pages when their
    keys are after the token's position; those before it were passed over, as for any keyset list."""
    baseline, candidate = new_run(graders=("exact",)), new_run(graders=("exact",))
    await insert(db, baseline, candidate)
    b_id, c_id = baseline.row["id"], candidate.row["id"]
    passed = run_pb2.RESULT_STATE_PASSED
    await record(db, [result_row(b_id, (f"i{n}", 0, "exact"), passed) for n in (1, 3, 5)])
    compare = service(db, monkeypatch)
    request = cpb.ListComparisonItemsRequest(baseline_run_id=b_id, candidate_run_id=c_id, page_size=2)
    page, token = await compare.list_items("t1", request)
    assert [(i.item_id, i.change) for i in page] == [
        ("i1", cpb.COMPARISON_CHANGE_UNPAIRED),
        ("i3", cpb.COMPARISON_CHANGE_UNPAIRED),
    ]
    await record(db, [result_row(c_id, (f"i{n}", 0, "exact"), passed) for n in (2, 4, 5)])
    request.page_token = token
    page, token = await compare.list_items("t1", request)
    assert [(i.item_id, i.change) for i in page] == [
        ("i4", cpb.COMPARISON_CHANGE_UNPAIRED),
        ("i5", cpb.COMPARISON_CHANGE_BOTH_PASSED),
    ]
    assert not token
