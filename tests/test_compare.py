"""CompareRuns and ListComparisonItems over a real server (gRPC and REST): pairing, the statistics
against scipy, unpaired evaluations, paging by change, partial comparisons and bad input."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
import pytest
from scipy import stats
from sqlalchemy import select

from evalsvc.server import EvalServer
from evalsvc.store import runs as run_store
from evalsvc.testing import EvalServiceTestServer
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import dataset_service_pb2_grpc, eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb
from tests import dbs
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply, chat_reply, judge_reply
from tests.helpers import all_results, error_reason, keyed_channel, serving_gateway, until, violations, watch_all
from tests.test_compare_stats import _newcombe_reference
from tests.unit.stored import forget_digests

N = 60
GRADERS = [
    grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.9)),
    grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch()),
]


class Service:
    def __init__(self, srv: EvalServer, http: httpx.AsyncClient, channel: grpc.aio.Channel):
        self.srv, self.http = srv, http
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", outbound_allow="127.0.0.1")
    async with serving_gateway(settings) as (srv, http):
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            yield Service(srv, http, channel)


def _items(correct: list[bool], seed: int) -> list[item_pb2.Item]:
    """Items whose recorded response is right or wrong; wrong ones differ by a little or a lot, so the
    similarity grader's scores vary."""
    rng = random.Random(seed)
    items = []
    for i, right in enumerate(correct):
        expected = f"the answer to question number {i}"
        wrong = expected[: rng.randint(5, len(expected) - 1)] + "?"
        items.append(
            item_pb2.Item(
                id=f"q{i:03d}",
                input=f"question {i}",
                expected_output=expected,
                response=item_pb2.Response(content=expected if right else wrong),
            )
        )
    return items


class HasRuns(Protocol):
    """A test server's EvalRunService stub (`Service`, or an `EvalServiceTestServer`)."""

    @property
    def runs(self) -> eval_run_service_pb2_grpc.EvalRunServiceStub: ...


PROVIDED = target_pb2.Target(provided=target_pb2.ProvidedTarget())


async def _run(
    svc: HasRuns,
    items: list[item_pb2.Item],
    graders: list[grader_pb2.Grader],
    repetitions: int = 1,
    target: target_pb2.Target = PROVIDED,
) -> run_pb2.Run:
    created = await svc.runs.CreateRun(
        pb.CreateRunRequest(items=items, target=target, graders=graders, repetitions=repetitions)
    )
    events = await watch_all(svc.runs, created.run.id)
    return events[-1].run


async def _two_runs(svc: Service) -> tuple[run_pb2.Run, run_pb2.Run, list[bool], list[bool]]:
    rng = random.Random(19)
    baseline_ok = [rng.random() < 0.8 for _ in range(N)]
    candidate_ok = [ok if rng.random() < 0.75 else not ok for ok in baseline_ok]
    baseline_items = _items(baseline_ok, 1)
    candidate_items = _items(candidate_ok, 2)
    candidate_items[5].ClearField("response")  # the candidate errs on q005: unpaired for both graders
    del candidate_items[-1]  # q059 only in the baseline: unpaired for both graders
    baseline = await _run(svc, baseline_items, list(reversed(GRADERS)))  # its own grader order
    candidate = await _run(svc, candidate_items, GRADERS)
    return baseline, candidate, baseline_ok, candidate_ok


async def test_compare_runs_pairs_evaluations_and_matches_independent_statistics(svc: Service) -> None:
    baseline, candidate, baseline_ok, candidate_ok = await _two_runs(svc)
    comparison = (await svc.runs.CompareRuns(pb_compare(baseline.id, candidate.id))).comparison
    assert not comparison.partial and comparison.alpha == 0.05
    assert [g.grader for g in comparison.graders] == ["similar", "exact"]  # the candidate's order

    counted = [i for i in range(N) if i not in (5, N - 1)]
    exact = next(g for g in comparison.graders if g.grader == "exact")
    b = sum(1 for i in counted if not baseline_ok[i] and candidate_ok[i])
    c = sum(1 for i in counted if baseline_ok[i] and not candidate_ok[i])
    both = sum(1 for i in counted if baseline_ok[i] and candidate_ok[i])
    neither = len(counted) - b - c - both
    assert (exact.pairs, exact.improved, exact.regressed, exact.both_passed, exact.both_failed, exact.unpaired) == (
        len(counted),
        b,
        c,
        both,
        neither,
        2,
    )
    assert exact.baseline_pass_rate == pytest.approx((both + c) / len(counted))
    assert exact.candidate_pass_rate == pytest.approx((both + b) / len(counted))
    assert exact.pass_rate_delta == pytest.approx((b - c) / len(counted))
    assert exact.mcnemar_p_value == pytest.approx(stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)
    assert (exact.delta_ci_low, exact.delta_ci_high) == pytest.approx(
        _newcombe_reference(both, b, c, neither, 0.05), abs=1e-12
    )

    # The similarity grader's scores, read back from the results, give the paired t interval.
    def scores(results: list[run_pb2.Result]) -> dict[str, float]:
        return {
            r.item_id: r.score
            for r in results
            if r.grader == "similar" and r.state in (run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED)
        }

    base_scores = scores(await all_results(svc.runs, baseline.id))
    cand_scores = scores(await all_results(svc.runs, candidate.id))
    paired = sorted(base_scores.keys() & cand_scores.keys())
    similar = comparison.graders[0]
    assert similar.pairs == len(paired) == len(counted)
    base = [base_scores[k] for k in paired]
    cand = [cand_scores[k] for k in paired]
    interval = stats.ttest_rel(cand, base).confidence_interval(0.95)
    assert similar.mean_score_delta == pytest.approx(sum(cand) / len(cand) - sum(base) / len(base), abs=1e-12)
    assert (similar.score_delta_ci_low, similar.score_delta_ci_high) == pytest.approx(
        (interval.low, interval.high), rel=1e-9
    )
    assert similar.baseline_mean_score == pytest.approx(sum(base) / len(base))

    overall = comparison.overall
    assert overall.grader == "" and overall.pairs == 2 * len(counted) and overall.unpaired == 4
    assert overall.improved == similar.improved + exact.improved
    assert overall.regressed == similar.regressed + exact.regressed


def pb_compare(baseline_id: str, candidate_id: str, alpha: float = 0.0) -> cpb.CompareRunsRequest:
    return cpb.CompareRunsRequest(baseline_run_id=baseline_id, candidate_run_id=candidate_id, alpha=alpha)


async def test_verdicts_follow_the_direction_and_alpha(svc: Service) -> None:
    exact = [GRADERS[1]]
    good = await _run(svc, _items([True] * 12, 1), exact)
    bad = await _run(svc, _items([True] * 4 + [False] * 8, 1), exact)
    regressed = (await svc.runs.CompareRuns(pb_compare(good.id, bad.id))).comparison.graders[0]
    assert regressed.verdict == cpb.COMPARISON_VERDICT_REGRESSED
    assert regressed.mcnemar_p_value == pytest.approx(2 / 2**8)
    improved = (await svc.runs.CompareRuns(pb_compare(bad.id, good.id))).comparison.graders[0]
    assert improved.verdict == cpb.COMPARISON_VERDICT_IMPROVED
    strict = (await svc.runs.CompareRuns(pb_compare(bad.id, good.id, alpha=0.001))).comparison.graders[0]
    assert strict.verdict == cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE
    same = (await svc.runs.CompareRuns(pb_compare(good.id, good.id))).comparison.graders[0]
    assert same.verdict == cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE and same.mcnemar_p_value == 1.0


async def test_a_comparison_without_pairs_says_so(svc: Service) -> None:
    """Two runs whose graders share no name had 0 pairs, "0.0% -> 0.0%" and NO_SIGNIFICANT_CHANGE for every
    grader and overall, which passed a regression gate: each is NO_PAIRS. A grader with pairs keeps its
    verdict even when most of its evaluations are unpaired."""
    items = _items([True] * 8, 1)
    exact_run = await _run(svc, items, [GRADERS[1]])
    similar_run = await _run(svc, items, [GRADERS[0]])
    disjoint = (await svc.runs.CompareRuns(pb_compare(exact_run.id, similar_run.id))).comparison
    assert [(g.grader, g.pairs, g.unpaired, g.verdict) for g in [*disjoint.graders, disjoint.overall]] == [
        ("similar", 0, 8, cpb.COMPARISON_VERDICT_NO_PAIRS),
        ("exact", 0, 8, cpb.COMPARISON_VERDICT_NO_PAIRS),
        ("", 0, 16, cpb.COMPARISON_VERDICT_NO_PAIRS),
    ]

    mostly_errors = _items([True] * 8, 1)
    for item in mostly_errors[1:]:
        item.ClearField("response")  # ERROR: unpaired
    erring = await _run(svc, mostly_errors, [GRADERS[1]])
    one_pair = (await svc.runs.CompareRuns(pb_compare(exact_run.id, erring.id))).comparison.overall
    assert (one_pair.pairs, one_pair.unpaired) == (1, 7)
    assert one_pair.verdict == cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pair 7 keys of each run at a time and read items 3 at a time (by size), so the items' digests
    are checked across chunk and batch boundaries, as they are in runs of more than 10,000 evaluations."""
    from evalsvc.runs import compare
    from evalsvc.store import comparisons

    monkeypatch.setattr(compare, "PAIRING_CHUNK", 7)
    monkeypatch.setattr(comparisons, "ITEM_BATCH_BYTES", 3 * item_pb2.Item(input="question 10?").ByteSize())


@pytest.mark.usefixtures("small_chunks")
async def test_runs_of_other_items_or_graders_give_no_verdict(svc: Service) -> None:
    """(a) Two runs of inline items without ids, the server numbering both item-1..30 by position: 30
    pairs of different questions, "30 regressed, p = 1.9e-09, REGRESSED". (b) The same outputs under a
    grader of the same name made case-sensitive: the same REGRESSED. Now a key whose items differ is no
    pair (`changed_items`), and a grader whose definition changed pairs nothing (`definition_changed`):
    NO_PAIRS, no confident verdict; what is still comparable keeps its verdict."""
    exact = grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())
    right = [item_pb2.Item(input=f"question {i}?", expected_output="yes") for i in range(30)]
    for item in right:
        item.response.content = "yes"
    # The first 10 questions in common, 20 others; every candidate answer wrong.
    wrong = [item_pb2.Item(input=f"question {i if i < 10 else 100 + i}?", expected_output="yes") for i in range(30)]
    for item in wrong:
        item.response.content = "no"
    baseline, candidate = await _run(svc, right, [exact]), await _run(svc, wrong, [exact])
    other_items = (await svc.runs.CompareRuns(pb_compare(baseline.id, candidate.id))).comparison
    assert other_items.changed_items == 20
    got = other_items.graders[0]
    assert (got.pairs, got.regressed, got.unpaired, got.definition_changed) == (10, 10, 20, False)
    assert got.verdict == cpb.COMPARISON_VERDICT_REGRESSED  # the 10 questions in common: a real regression
    unrelated = [item_pb2.Item(input=f"other {i}?", expected_output="yes") for i in range(30)]
    for item in unrelated:
        item.response.content = "no"
    disjoint = await _run(svc, unrelated, [exact])
    nothing_shared = (await svc.runs.CompareRuns(pb_compare(baseline.id, disjoint.id))).comparison
    assert nothing_shared.changed_items == 30
    assert [(g.pairs, g.unpaired, g.verdict) for g in [*nothing_shared.graders, nothing_shared.overall]] == [
        (0, 30, cpb.COMPARISON_VERDICT_NO_PAIRS)
    ] * 2

    # (b) byte-identical outputs; "exact" made case-sensitive, "similar" unchanged.
    items = [item_pb2.Item(id=f"i{i:02d}", input=f"q{i}", expected_output="Paris") for i in range(30)]
    for item in items:
        item.response.content = "paris"
    similar = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.5))
    lenient = grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch(case_insensitive=True))
    before = await _run(svc, items, [lenient, similar])
    after = await _run(svc, items, [exact, similar])
    redefined = (await svc.runs.CompareRuns(pb_compare(before.id, after.id))).comparison
    assert redefined.changed_items == 0
    by_name = {g.grader: g for g in redefined.graders}
    assert by_name["exact"].definition_changed and not by_name["similar"].definition_changed
    assert (by_name["exact"].pairs, by_name["exact"].regressed, by_name["exact"].unpaired) == (0, 0, 30)
    assert by_name["exact"].verdict == cpb.COMPARISON_VERDICT_NO_PAIRS
    assert (by_name["similar"].pairs, by_name["similar"].verdict) == (30, cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE)
    assert (redefined.overall.pairs, redefined.overall.regressed, redefined.overall.unpaired) == (30, 0, 30)

    reply = await svc.http.get(f"/v1/runs/{after.id}:compare", params={"baseline_run_id": before.id})
    assert reply.status_code == 200, reply.text
    rest = {g["grader"]: g for g in reply.json()["comparison"]["graders"]}
    assert rest["exact"]["definitionChanged"] is True and not rest["similar"].get("definitionChanged")
    reply = await svc.http.get(f"/v1/runs/{disjoint.id}:compare", params={"baseline_run_id": baseline.id})
    assert int(reply.json()["comparison"]["changedItems"]) == 30


@pytest.mark.usefixtures("small_chunks")
async def test_runs_of_the_same_items_and_graders_are_compared_as_before(svc: Service) -> None:
    """No false positives: runs of the same dataset, or of the same inline items whose recorded responses,
    metadata and human verdicts differ, with repetitions and a grader whose weight alone changed, pair
    every evaluation and keep their verdicts."""
    exact = grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())
    similar = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.9))
    heavy = grader_pb2.Grader(name="similar", weight=3, similarity=grader_pb2.Similarity(threshold=0.9))
    good, bad = _items([True] * 12, 1), _items([True] * 2 + [False] * 10, 1)
    for i, item in enumerate(bad):
        item.metadata["model"] = "candidate"
        item.human_verdicts["exact"] = i % 2 == 0
    baseline = await _run(svc, good, [exact, similar], repetitions=2)
    candidate = await _run(svc, bad, [heavy, exact], repetitions=2)
    same_items = (await svc.runs.CompareRuns(pb_compare(baseline.id, candidate.id))).comparison
    assert same_items.changed_items == 0
    assert [(g.grader, g.pairs, g.unpaired, g.definition_changed) for g in same_items.graders] == [
        ("similar", 24, 0, False),
        ("exact", 24, 0, False),
    ]
    assert (same_items.graders[1].regressed, same_items.graders[1].verdict) == (20, cpb.COMPARISON_VERDICT_REGRESSED)

    dataset = (await svc.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="qa")))).dataset
    await svc.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=_items([True] * 9, 3)))
    runs = []
    for _ in range(2):
        created = await svc.runs.CreateRun(
            pb.CreateRunRequest(
                dataset_id=dataset.id,
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[exact, similar],
                repetitions=3,
            )
        )
        runs.append((await watch_all(svc.runs, created.run.id))[-1].run)
    of_dataset = (await svc.runs.CompareRuns(pb_compare(runs[0].id, runs[1].id))).comparison
    assert of_dataset.changed_items == 0
    assert [(g.pairs, g.unpaired, g.definition_changed, g.verdict) for g in of_dataset.graders] == [
        (27, 0, False, cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE)
    ] * 2


Judge = grader_pb2.LlmJudge
PASSES = judge_reply({"passed": True, "score": 9, "reason": "right"})
FAILS = judge_reply({"passed": False, "score": 2, "reason": "wrong"})


def _pairs(comparison: cpb.RunComparison) -> list[tuple[str, int, int, bool, int]]:
    """(grader, pairs, unpaired, definition_changed, verdict) of each grader of a comparison."""
    return [(g.grader, g.pairs, g.unpaired, g.definition_changed, g.verdict) for g in comparison.graders]


async def test_runs_graded_by_different_default_judge_models_are_not_compared(tmp_path: Path) -> None:
    """Two servers on one database, one with --judge-model lenient-judge, the other strict-judge; a judge
    naming no model, byte-identical outputs. The runs recorded no model: the judge was the same definition
    in both, and the strict model's verdicts read as 10 regressions, REGRESSED. Now a run records the default
    model its judges without one are graded by (`default_judge_model`; the graders stay as written, graded
    with the grading server's default endpoint, key and model together), and the judge is a changed
    definition: NO_PAIRS. A rerun records today's default. A
    judge spelled out as its defaults (threshold 7, binary scoring, the default model, an endpoint with only
    a timeout, which is not used) is the same judge."""
    judge = grader_pb2.Grader(name="judge", llm_judge=Judge(mode=Judge.MODE_CRITERIA, criteria="correct"))
    spelled = grader_pb2.Grader(
        name="judge",
        llm_judge=Judge(
            mode=Judge.MODE_CRITERIA,
            criteria="correct",
            scoring=Judge.SCORING_BINARY,
            threshold=7,
            model="strict-judge",
            endpoint=target_pb2.Endpoint(timeout_s=30),
        ),
    )
    items = _items([True] * 10, 1)
    database = dbs.db_url(tmp_path)
    with FakeEndpoint(PASSES) as llm:
        judged = {
            "judge_base_url": llm.url + "/v1",
            "judge_api_key": "jk",
            "outbound_allow": "127.0.0.1",
            "database_url": database,
        }
        async with EvalServiceTestServer(judge_model="lenient-judge", **judged) as lenient:
            baseline = await _run(lenient, items, [judge])
        llm.script = [FAILS]
        async with EvalServiceTestServer(judge_model="strict-judge", **judged) as strict:
            candidate = await _run(strict, items, [judge])
            again = await _run(strict, items, [spelled])
            across = (await strict.runs.CompareRuns(pb_compare(baseline.id, candidate.id))).comparison
            alike = (await strict.runs.CompareRuns(pb_compare(candidate.id, again.id))).comparison
            shown = (await strict.runs.GetRun(pb.GetRunRequest(run_id=baseline.id))).run
            every = pb.RerunRunRequest(run_id=baseline.id, scope=pb.RERUN_SCOPE_ITEMS_ALL)
            rerun = (await strict.runs.RerunRun(every)).run
            await watch_all(strict.runs, rerun.id)
    assert {seen.body["model"] for seen in llm.seen} == {"lenient-judge", "strict-judge"}
    assert {seen.headers["authorization"] for seen in llm.seen} == {"Bearer jk"}
    assert [(r.counts.passed, r.counts.failed) for r in (baseline, candidate)] == [(10, 0), (0, 10)]
    assert _pairs(across) == [("judge", 0, 10, True, cpb.COMPARISON_VERDICT_NO_PAIRS)]  # was 10 REGRESSED
    assert (shown.default_judge_model, candidate.default_judge_model) == ("lenient-judge", "strict-judge")
    assert not shown.graders[0].llm_judge.model and not shown.graders[0].llm_judge.HasField("endpoint")
    assert rerun.default_judge_model == "strict-judge"  # graded by today's default judge, as recorded
    assert _pairs(alike) == [("judge", 10, 0, False, cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE)]


async def test_settings_spelled_as_their_defaults_are_no_change(svc: Service) -> None:
    """`similarity{}` and `similarity{threshold: 0.8}` (0 means 0.8, and so does -0.0), a cost bound of
    -0.0 and 0: the same graders, each reported as changed, its verdict NO_PAIRS (a gate's NO VERDICT).
    A threshold that is not the default is still a change."""
    items = _items([True] * 6 + [False] * 6, 1)
    similar = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity())
    cheap = grader_pb2.Grader(name="cheap", cost=grader_pb2.Cost())
    spelled = [
        grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.8)),
        grader_pb2.Grader(name="cheap", cost=grader_pb2.Cost(max_usd=-0.0)),
    ]
    negative_zero = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=-0.0))
    stricter = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.9))
    plain = await _run(svc, items, [similar, cheap])
    for graders in (spelled, [negative_zero, cheap]):
        other = await _run(svc, items, graders)
        comparison = (await svc.runs.CompareRuns(pb_compare(plain.id, other.id))).comparison
        assert [(name, pairs, changed) for name, pairs, _, changed, _ in _pairs(comparison)] == [
            ("similar", 12, False),
            ("cheap", 12, False),
        ]
    changed = await _run(svc, items, [stricter, cheap])
    comparison = (await svc.runs.CompareRuns(pb_compare(plain.id, changed.id))).comparison
    assert [(name, changed) for name, _, _, changed, _ in _pairs(comparison)] == [("similar", True), ("cheap", False)]


async def test_item_metadata_is_compared_when_the_target_is_sent_it(svc: Service) -> None:
    """A webhook is sent each item's metadata with it (and may answer by it: the response cache keys its
    outputs by it), but two runs whose items differed in metadata alone paired them as the same items.
    Now metadata makes items differ when either run's target is a webhook; a chat target is never sent
    it, and its runs still pair such items."""
    exact = grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())

    def items(locale: str) -> list[item_pb2.Item]:
        return [
            item_pb2.Item(
                id=f"m{i}",
                input=f"q{i}",
                expected_output="yes",
                metadata={"locale": locale},
                response=item_pb2.Response(content="yes"),
            )
            for i in range(6)
        ]

    with FakeEndpoint(Reply({"content": "yes"})) as hook, FakeEndpoint(chat_reply("yes")) as model:
        webhook = target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=hook.url)))
        chat = target_pb2.Target(
            chat=target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url=model.url + "/v1"), model="m")
        )
        english = await _run(svc, items("en"), [exact], target=webhook)
        french = await _run(svc, items("fr"), [exact], target=webhook)
        english_again = await _run(svc, items("en"), [exact], target=webhook)
        chats = [await _run(svc, items(locale), [exact], target=chat) for locale in ("en", "fr")]
        recorded = await _run(svc, items("fr"), [exact])  # provided: its target is sent nothing
    assert {seen.body["item"]["metadata"]["locale"] for seen in hook.seen} == {"en", "fr"}
    expected = [
        (english, french, 6),
        (english, english_again, 0),
        (english, recorded, 6),  # the baseline's webhook was sent metadata the candidate's items do not have
        (chats[0], chats[1], 0),
        (chats[0], recorded, 0),
    ]
    for baseline, candidate, changed in expected:
        comparison = (await svc.runs.CompareRuns(pb_compare(baseline.id, candidate.id))).comparison
        assert (comparison.changed_items, comparison.graders[0].pairs) == (changed, 6 - changed)


async def test_list_comparison_items_pages_through_one_change_side_by_side(svc: Service) -> None:
    baseline, candidate, baseline_ok, candidate_ok = await _two_runs(svc)
    expected = [f"q{i:03d}" for i in range(N - 1) if i != 5 and baseline_ok[i] and not candidate_ok[i]]
    assert len(expected) > 3
    seen: list[cpb.ComparisonItem] = []
    token = ""
    for _ in range(len(expected)):
        page = await svc.runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(
                baseline_run_id=baseline.id,
                candidate_run_id=candidate.id,
                grader="exact",
                change=cpb.COMPARISON_CHANGE_REGRESSED,
                page_size=3,
                page_token=token,
            )
        )
        seen.extend(page.items)
        if not (token := page.next_page_token):
            break
    assert [item.item_id for item in seen] == expected
    for item in seen:
        assert item.change == cpb.COMPARISON_CHANGE_REGRESSED and item.grader == "exact"
        assert item.baseline.passed and not item.candidate.passed
        assert item.baseline.output.content == f"the answer to question number {int(item.item_id[1:])}"
        assert item.candidate.output.content != item.baseline.output.content
        assert item.baseline.explanation and item.candidate.explanation

    unpaired = await svc.runs.ListComparisonItems(
        cpb.ListComparisonItemsRequest(
            baseline_run_id=baseline.id, candidate_run_id=candidate.id, change=cpb.COMPARISON_CHANGE_UNPAIRED
        )
    )
    shown = [(i.item_id, i.grader, i.HasField("baseline"), i.HasField("candidate")) for i in unpaired.items]
    assert shown == [
        ("q005", "exact", True, True),
        ("q005", "similar", True, True),
        ("q059", "exact", True, False),
        ("q059", "similar", True, False),
    ]
    assert unpaired.items[0].candidate.state == run_pb2.RESULT_STATE_ERROR


async def test_a_running_run_gives_a_partial_comparison(svc: Service) -> None:
    done = await _run(svc, _items([True] * 3, 1), [GRADERS[1]])
    with FakeEndpoint(Reply(chat_reply("x").body, delay_s=30)) as endpoint:
        running = await svc.runs.CreateRun(
            pb.CreateRunRequest(
                items=_items([True] * 3, 1),
                target=target_pb2.Target(
                    chat=target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url=endpoint.url), model="m")
                ),
                graders=[GRADERS[1]],
            )
        )
        comparison = (await svc.runs.CompareRuns(pb_compare(done.id, running.run.id))).comparison
        assert comparison.partial
        assert comparison.graders[0].pairs == 0 and comparison.graders[0].unpaired == 3
        assert comparison.graders[0].verdict == cpb.COMPARISON_VERDICT_NO_PAIRS
        await svc.runs.CancelRun(pb.CancelRunRequest(run_id=running.run.id))


async def test_bad_requests_and_unknown_runs(svc: Service) -> None:
    run = await _run(svc, _items([True], 1), [GRADERS[1]])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.runs.CompareRuns(cpb.CompareRunsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"baseline_run_id", "candidate_run_id"}
    for alpha in (0.6, -0.1, math.nan, 1e-17, 5e-324):  # the last two: INTERNAL (StatisticsError) before
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.runs.CompareRuns(pb_compare(run.id, run.id, alpha=alpha))
        assert set(violations(err.value)) == {"alpha"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.runs.CompareRuns(pb_compare(run.id, "run_missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(err.value) == "RUN_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=run.id, candidate_run_id=run.id, page_token="garbage")
        )
    assert set(violations(err.value)) == {"page_token"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(baseline_run_id=run.id, candidate_run_id=run.id, change=99)  # type: ignore[arg-type]
        )
    assert set(violations(err.value)) == {"change"}


async def test_rest_routes(svc: Service) -> None:
    exact = [GRADERS[1]]
    good = await _run(svc, _items([True] * 12, 1), exact)
    bad = await _run(svc, _items([True] * 4 + [False] * 8, 1), exact)
    reply = await svc.http.get(f"/v1/runs/{bad.id}:compare", params={"baseline_run_id": good.id})
    assert reply.status_code == 200, reply.text
    comparison = reply.json()["comparison"]
    assert comparison["graders"][0]["verdict"] == "COMPARISON_VERDICT_REGRESSED"
    assert comparison["graders"][0]["regressed"] == 8
    items = await svc.http.get(
        f"/v1/runs/{bad.id}:compareItems",
        params={"baseline_run_id": good.id, "change": "COMPARISON_CHANGE_REGRESSED", "page_size": 5},
    )
    assert items.status_code == 200, items.text
    assert len(items.json()["items"]) == 5 and items.json()["nextPageToken"]
    nothing = await svc.http.get(
        f"/v1/runs/{good.id}:compare", params={"baseline_run_id": (await _run(svc, _items([True], 1), GRADERS[:1])).id}
    )
    assert nothing.json()["comparison"]["overall"]["verdict"] == "COMPARISON_VERDICT_NO_PAIRS"
    missing = await svc.http.get("/v1/runs/run_nope:compare", params={"baseline_run_id": good.id})
    assert missing.status_code == 404
    # A nonzero alpha that underflows to 0 (the default, 0.05) is refused, as gRPC refuses 5e-324: it was read as
    # 0.05, the strictest level asked for silently replaced by a lenient one. Zero itself still means the default.
    for text in ("1e-400", "-1e-400", "0.000001e-399"):
        tiny = await svc.http.get(f"/v1/runs/{bad.id}:compare", params={"baseline_run_id": good.id, "alpha": text})
        assert tiny.status_code == 400, (text, tiny.text)
        assert "alpha" in tiny.text and "too small" in tiny.text
    for text in ("0", "0.0", "-0", "0e-400"):
        zero = await svc.http.get(f"/v1/runs/{bad.id}:compare", params={"baseline_run_id": good.id, "alpha": text})
        assert zero.status_code == 200 and zero.json()["comparison"]["alpha"] == 0.05, (text, zero.text)


async def test_pairings_run_one_at_a_time_and_every_caller_gets_its_answer(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairing holds Python's one lock in its thread: four at once left the event loop - every other
    tenant's calls - a fraction of it (a reviewer saw GetRun take up to a second beside four comparisons
    of 100,000-evaluation runs). They now run one at a time; each caller still gets its comparison."""
    import threading

    from evalsvc.runs import compare as compare_module

    baseline, candidate, _, _ = await _two_runs(svc)
    running = most = 0
    lock = threading.Lock()
    real = compare_module.Pairing.merge

    def observed(*args: Any) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.05)  # in the worker thread: long enough for the others to start if they could
            return real(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(compare_module.Pairing, "merge", observed)
    monkeypatch.setattr(compare_module, "PAIRING_CHUNK", 7)  # many chunks a comparison
    request = cpb.CompareRunsRequest(baseline_run_id=baseline.id, candidate_run_id=candidate.id)
    answers = await asyncio.gather(*(svc.runs.CompareRuns(request) for _ in range(4)))
    assert most == 1
    assert len({answer.SerializeToString() for answer in answers}) == 1 and answers[0].comparison.overall.pairs > 0
    monkeypatch.setattr(compare_module, "PAIRING_CHUNK", 10_000)  # one chunk: the same comparison
    assert (await svc.runs.CompareRuns(request)).SerializeToString() == answers[0].SerializeToString()


async def test_comparisons_wait_for_their_turn_before_reading_their_runs(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each CompareRuns read both runs whole, on the event loop, before it queued for the pairing turn:
    8 comparisons of two 400,000-evaluation runs at once grew the server by 1.6 GB and stalled every
    tenant's GetRun. A comparison now reads only in its turn, a chunk at a time: while one reads, the
    others wait holding nothing of their runs."""
    from evalsvc.runs import compare as compare_module
    from evalsvc.store import comparisons as comparison_store

    baseline, candidate, _, _ = await _two_runs(svc)
    gate = asyncio.Event()
    readers: set[asyncio.Task[Any] | None] = set()
    real_after = comparison_store.evaluations_after

    async def after(*args: Any) -> Any:
        readers.add(asyncio.current_task())
        await gate.wait()
        return await real_after(*args)

    monkeypatch.setattr(comparison_store, "evaluations_after", after)
    monkeypatch.setattr(compare_module, "PAIRING_CHUNK", 7)
    import gc  # the server's CompareService, to see comparisons wait for their turn

    services = [o for o in gc.get_objects() if isinstance(o, compare_module.CompareService)]
    assert services
    request = cpb.CompareRunsRequest(baseline_run_id=baseline.id, candidate_run_id=candidate.id)
    calls = [asyncio.ensure_future(svc.runs.CompareRuns(request)) for _ in range(3)]
    # Either every call is reading (the defect), or one reads and two wait for their turn (the one in its
    # turn may not have reached its read yet when the other two are found waiting: wait for it too).
    await until(lambda: len(readers) >= 3 or (bool(readers) and any(s._pairing.waiting == 2 for s in services)))
    assert len(readers) == 1  # the waiting comparisons read nothing
    gate.set()
    answers = await asyncio.gather(*calls)
    assert len({answer.SerializeToString() for answer in answers}) == 1 and answers[0].comparison.overall.pairs > 0


async def test_pages_with_a_change_filter_are_read_a_few_at_a_time(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page with a `change` filter may pass over a whole run's keys to fill (234 ms for two runs of
    50,000 evaluations when nothing matches), reading on the event loop with a reader connection held:
    32 of them at once took every reader connection and raised every tenant's loop lag. At most
    FILTERED_PAGES are read at once; pages without a filter are not held back; every caller gets its page."""
    from evalsvc.runs import compare as compare_module
    from evalsvc.store import comparisons as comparison_store

    baseline, candidate, _, _ = await _two_runs(svc)
    running = most = 0
    real = comparison_store.evaluations_after

    async def observed(*args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.02)  # a slow read: long enough for the other pages to start if they could
            return await real(*args)
        finally:
            running -= 1

    monkeypatch.setattr(comparison_store, "evaluations_after", observed)

    def page(change: int) -> Any:
        return svc.runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(
                baseline_run_id=baseline.id, candidate_run_id=candidate.id, change=change, page_size=5
            )
        )

    regressed = cpb.COMPARISON_CHANGE_REGRESSED
    answers = await asyncio.gather(*(page(regressed) for _ in range(8)))
    assert most == compare_module.FILTERED_PAGES  # a page reads its runs one after the other
    assert len({answer.SerializeToString() for answer in answers}) == 1
    assert all(item.change == regressed for item in answers[0].items) and answers[0].items
    most = 0
    await asyncio.gather(*(page(0) for _ in range(8)))
    assert most > compare_module.FILTERED_PAGES  # unfiltered pages are not held back


CHANGES = (
    (cpb.COMPARISON_CHANGE_REGRESSED, "regressed"),
    (cpb.COMPARISON_CHANGE_IMPROVED, "improved"),
    (cpb.COMPARISON_CHANGE_BOTH_PASSED, "both_passed"),
    (cpb.COMPARISON_CHANGE_BOTH_FAILED, "both_failed"),
    (cpb.COMPARISON_CHANGE_UNPAIRED, "unpaired"),
)


async def _listed(svc: HasRuns, baseline_id: str, candidate_id: str, grader: str = "", change: int = 0) -> list[Any]:
    """Every ComparisonItem ListComparisonItems lists with these filters, a few per page."""
    listed: list[cpb.ComparisonItem] = []
    token = ""
    while True:
        page = await svc.runs.ListComparisonItems(
            cpb.ListComparisonItemsRequest(
                baseline_run_id=baseline_id, candidate_run_id=candidate_id, grader=grader,
                change=change, page_size=7, page_token=token,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        listed.extend(page.items)
        if not (token := page.next_page_token):
            return listed


def _drifted_runs_items() -> tuple[list[item_pb2.Item], list[item_pb2.Item]]:
    """20 items the baseline answers right; the candidate's q00-q04 are other questions answered wrong
    (pairs of different items, which read as regressions), q05 errs and q19 is missing; the rest are the
    same questions, half answered wrong."""
    baseline = [
        item_pb2.Item(id=f"q{i:02d}", input=f"question {i}", expected_output=f"answer {i}", metadata={"run": "b"})
        for i in range(20)
    ]
    for item in baseline:
        item.response.content = item.expected_output
    candidate = [item_pb2.Item() for _ in range(19)]
    for i, item in enumerate(candidate):
        item.CopyFrom(baseline[i])
        item.metadata["run"] = "c"  # metadata alone: the same item (a provided target is sent none)
        if i < 5:
            item.input = f"another question {i}"
        if i < 5 or i % 2:
            item.response.content = "wrong"
    candidate[5].ClearField("response")
    return baseline, candidate


@pytest.mark.usefixtures("small_chunks")
async def test_change_filters_list_what_compare_runs_counted(svc: Service) -> None:
    """Runs with 5 changed items and a grader whose definition changed: CompareRuns counted 3 REGRESSED
    where ListComparisonItems(change=REGRESSED) listed 8, its pairs of different items among them, and the
    changed grader's BOTH_PASSED that CompareRuns never paired. Now, per grader and overall, each `change`
    filter lists as many as CompareRuns counted, and an UNPAIRED item says why."""
    baseline_items, candidate_items = _drifted_runs_items()
    exact = grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())
    lenient = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.2))
    strict = grader_pb2.Grader(name="similar", similarity=grader_pb2.Similarity(threshold=0.9))
    baseline = await _run(svc, baseline_items, [exact, lenient])
    candidate = await _run(svc, candidate_items, [exact, strict])
    comparison = (await svc.runs.CompareRuns(pb_compare(baseline.id, candidate.id))).comparison
    assert comparison.changed_items == 10  # 5 items x 2 graders
    by_name = {g.grader: g for g in comparison.graders}
    assert by_name["similar"].definition_changed and by_name["exact"].regressed > 0
    for grader, counted in [*by_name.items(), ("", comparison.overall)]:
        for change, field in CHANGES:
            listed = await _listed(svc, baseline.id, candidate.id, grader, change)
            assert len(listed) == getattr(counted, field), (grader, field)
            assert all(item.change == change for item in listed)

    reasons: dict[int, list[tuple[str, str]]] = {}
    for item in await _listed(svc, baseline.id, candidate.id):
        paired = item.change != cpb.COMPARISON_CHANGE_UNPAIRED
        assert paired == (item.unpaired_reason == cpb.UNPAIRED_REASON_UNSPECIFIED)
        reasons.setdefault(item.unpaired_reason, []).append((item.item_id, item.grader))
    ids = [f"q{i:02d}" for i in range(20)]
    assert sorted(reasons[cpb.UNPAIRED_REASON_ITEM_CHANGED]) == [(i, g) for i in ids[:5] for g in ("exact", "similar")]
    assert reasons[cpb.UNPAIRED_REASON_ONE_RUN] == [("q19", "exact"), ("q19", "similar")]
    assert reasons[cpb.UNPAIRED_REASON_DEFINITION_CHANGED] == [(i, "similar") for i in ids[5:19]]
    assert reasons[cpb.UNPAIRED_REASON_NOT_GRADED] == [("q05", "exact")]
    assert len(reasons[cpb.UNPAIRED_REASON_UNSPECIFIED]) == comparison.overall.pairs == 13

    reply = await svc.http.get(
        f"/v1/runs/{candidate.id}:compareItems",
        params={"baseline_run_id": baseline.id, "change": "COMPARISON_CHANGE_UNPAIRED", "grader": "similar"},
    )
    assert reply.status_code == 200, reply.text
    assert {i["unpairedReason"] for i in reply.json()["items"]} == {
        "UNPAIRED_REASON_ITEM_CHANGED",
        "UNPAIRED_REASON_DEFINITION_CHANGED",
        "UNPAIRED_REASON_ONE_RUN",
    }


async def _digests_stored(srv: EvalServer, run_id: str) -> tuple[int, int]:
    """(items with their digests, items without) of a run, as stored."""
    items = run_store.ITEMS
    async with srv.db.read() as conn:
        rows = await conn.execute(select(items.c.digest_with_metadata).where(items.c.run_id == run_id))
        stored = [digest is not None for (digest,) in rows]
    return sum(stored), len(stored) - sum(stored)


@pytest.mark.usefixtures("small_chunks")
async def test_a_run_stored_before_item_digests_compares_as_a_new_one(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way a run gets items stores their digests: CreateRun of inline items, of a dataset's, a large
    CreateRun staged in chunks, RerunRun. A run stored before revision 0028 has none (NULL): compared with a
    new run, its items are hashed as they are read, and pair with the new run's as the stored digests do,
    metadata compared (a webhook target) or not."""
    from evalsvc.runs import service as run_service

    baseline_items, candidate_items = _drifted_runs_items()
    exact = grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())
    baseline = await _run(svc, baseline_items, [exact])
    monkeypatch.setattr(run_service, "STAGE_ABOVE_ROWS", 10)  # 19 items and 19 jobs: staged
    monkeypatch.setattr(run_service, "STAGE_CHUNK_ROWS", 8)
    candidate = await _run(svc, candidate_items, [exact])
    monkeypatch.undo()
    dataset = (await svc.datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="qa")))).dataset
    await svc.datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=baseline_items))
    created = await svc.runs.CreateRun(pb.CreateRunRequest(dataset_id=dataset.id, target=PROVIDED, graders=[exact]))
    of_dataset = (await watch_all(svc.runs, created.run.id))[-1].run
    rerun = (await svc.runs.RerunRun(pb.RerunRunRequest(run_id=candidate.id, scope=pb.RERUN_SCOPE_ITEMS_ALL))).run
    await watch_all(svc.runs, rerun.id)
    for run, items in ((baseline, 20), (candidate, 19), (of_dataset, 20), (rerun, 19)):
        assert await _digests_stored(svc.srv, run.id) == (items, 0)

    async def compared(baseline_id: str, candidate_id: str) -> tuple[Any, ...]:
        comparison = (await svc.runs.CompareRuns(pb_compare(baseline_id, candidate_id))).comparison
        listed = await _listed(svc, baseline_id, candidate_id)
        shown = [(i.item_id, i.change, i.unpaired_reason) for i in listed]
        return comparison.changed_items, [(g.pairs, g.regressed, g.unpaired) for g in comparison.graders], shown

    pairs = [(baseline.id, candidate.id), (candidate.id, of_dataset.id), (of_dataset.id, rerun.id)]
    before = [await compared(*pair) for pair in pairs]
    assert [changed for changed, _, _ in before] == [5, 5, 5]

    await forget_digests(svc.srv.db, baseline.id, candidate.id)
    assert await _digests_stored(svc.srv, baseline.id) == (0, 20)
    assert [await compared(*pair) for pair in pairs] == before

    # Metadata compared: a webhook's runs of items differing in metadata alone are of different items.
    relabelled = [item_pb2.Item() for _ in range(6)]
    for item, source in zip(relabelled, baseline_items, strict=False):
        item.CopyFrom(source)
        item.metadata["run"] = "c"
    with FakeEndpoint(Reply({"content": "yes"})) as hook:
        webhook = target_pb2.Target(http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=hook.url)))
        old = await _run(svc, baseline_items[:6], [exact], target=webhook)
        other = await _run(svc, relabelled, [exact], target=webhook)
        same = await _run(svc, baseline_items[:6], [exact], target=webhook)
    await forget_digests(svc.srv.db, old.id)
    for new, changed in ((other, 6), (same, 0)):
        comparison = (await svc.runs.CompareRuns(pb_compare(old.id, new.id))).comparison
        assert (comparison.changed_items, comparison.graders[0].pairs) == (changed, 6 - changed)


async def test_a_refused_create_run_hashes_none_of_its_items(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateRun stores its items' digests (compare.digests_of, ~6 ms a MB). It hashed them before its cheap
    refusals: a request whose definitions were too large, or a large (staged) one over a tenant limit
    checked before anything is staged, paid for hashing every item first. The hashing comes just before
    the run is stored or staged."""
    from evalsvc.limits import quota_exceeded
    from evalsvc.runs import service as run_service

    hashed: list[int] = []
    digests_of = run_service.digests_of

    async def counted(items: Any) -> Any:
        hashed.append(len(items))
        return await digests_of(items)

    def at_cap(_held: int) -> None:
        raise quota_exceeded("stored_runs", "at the cap")

    monkeypatch.setattr(run_service, "digests_of", counted)
    request = pb.CreateRunRequest(items=_items([True] * 20, seed=3), target=PROVIDED, graders=GRADERS)
    max_definition_bytes = svc.srv.runs._max_definition_bytes
    svc.srv.runs._max_definition_bytes = 10
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await svc.runs.CreateRun(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    svc.srv.runs._max_definition_bytes = max_definition_bytes
    monkeypatch.setattr(run_service, "STAGE_ABOVE_ROWS", 10)  # 20 items and 20 jobs: staged
    monkeypatch.setattr(svc.srv.runs, "_check_stored_runs", at_cap)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await svc.runs.CreateRun(request)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert hashed == []
    monkeypatch.delattr(svc.srv.runs, "_check_stored_runs")
    await watch_all(svc.runs, (await svc.runs.CreateRun(request)).run.id)
    assert hashed == [20]
