"""A grader's agreement with people's verdicts (Item.human_verdicts): counted per result, summed in
the run's aggregate as a confusion matrix with accuracy and Cohen's kappa (judge calibration)."""

from __future__ import annotations

import math

import pytest

from evalsvc.execution.aggregate import build_aggregate
from evalsvc.store.records import GraderTally
from evalsvc.store.runs import AggregateInputs
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import grader_pb2, run_pb2
from tests.helpers import all_results, create_request, exact, provided_items, watch_all

PASSED, FAILED, ERROR = run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED, run_pb2.RESULT_STATE_ERROR


def tally(state: int, human: bool | None, n: int) -> GraderTally:
    return GraderTally("r", "judge", state, human, n, float(n if state == PASSED else 0), 0.0, 0.0, 0.0, 0)


def test_agreement_is_a_confusion_matrix_with_accuracy_and_kappa() -> None:
    """40 both passed, 10 the grader passed and the person failed, 5 the reverse, 45 both failed:
    accuracy 0.85, chance 0.5, kappa (0.85 - 0.5) / (1 - 0.5) = 0.7; errors and unlabelled results
    are not compared."""
    inputs = AggregateInputs(
        [
            tally(PASSED, True, 40),
            tally(PASSED, False, 10),
            tally(FAILED, True, 5),
            tally(FAILED, False, 45),
            tally(ERROR, True, 3),
            tally(PASSED, None, 100),  # no person's verdict
        ],
        [],
        0.0,
        [],
        [],
    )
    [judge] = build_aggregate(["judge"], inputs).graders
    agreement = judge.agreement
    assert (agreement.both_passed, agreement.grader_passed_person_failed) == (40, 10)
    assert (agreement.grader_failed_person_passed, agreement.both_failed, agreement.errored) == (5, 45, 3)
    assert math.isclose(agreement.accuracy, 0.85) and math.isclose(agreement.cohen_kappa, 0.7)
    assert judge.passed == 150 and judge.failed == 50  # the grader's own counts are unchanged


def test_no_labelled_result_means_no_agreement_and_chance_alone_is_kappa_0() -> None:
    [unlabelled] = build_aggregate(["judge"], AggregateInputs([tally(PASSED, None, 5)], [], 0.0, [], [])).graders
    assert not unlabelled.HasField("agreement")
    [one_sided] = build_aggregate(["judge"], AggregateInputs([tally(PASSED, True, 5)], [], 0.0, [], [])).graders
    assert one_sided.agreement.accuracy == 1.0 and one_sided.agreement.cohen_kappa == 0.0


async def test_a_run_reports_how_its_grader_agrees_with_people(runs) -> None:
    """Eight recorded answers, every fourth wrong; people judged them, twice disagreeing with the exact
    match. Each result says which verdict it was compared with; the aggregate counts the agreement.
    A verdict for a grader the run does not have is ignored (a dataset's items may carry several)."""
    items = provided_items(8, wrong_every=4)  # i0 and i4 are wrong: exact FAILS them
    people = {"i0": False, "i1": True, "i2": False, "i3": True, "i4": True, "i5": True}  # i2, i4 disagree
    for item in items:
        if item.id in people:
            item.human_verdicts["exact"] = people[item.id]
        item.human_verdicts["another-grader"] = True
    run = (await runs.CreateRun(create_request(items=items, pass_threshold=50))).run
    await watch_all(runs, run.id)
    ended = (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run
    [grader] = ended.aggregate.graders
    agreement = grader.agreement
    assert (agreement.both_passed, agreement.both_failed) == (3, 1)  # i1, i3, i5; i0
    assert (agreement.grader_passed_person_failed, agreement.grader_failed_person_passed) == (1, 1)  # i2; i4
    assert agreement.accuracy == pytest.approx(4 / 6)
    # chance: grader passes 4/6, people pass 4/6: (4*4 + 2*2) / 36 = 20/36; kappa = (24/36 - 20/36) / (16/36)
    assert agreement.cohen_kappa == pytest.approx(0.25)
    verdicts = {
        r.item_id: (r.human_verdict if r.HasField("human_verdict") else None) for r in await all_results(runs, run.id)
    }
    assert verdicts == {item.id: people.get(item.id) for item in items}


async def test_judge_verdicts_are_compared_by_grader_name(runs) -> None:
    """The verdicts are keyed by the grader's name: two graders of one run, each compared with its own."""
    items = provided_items(2)
    items[0].human_verdicts.update({"exact": True, "has-answer": False})
    graders = [exact(), grader_pb2.Grader(name="has-answer", contains=grader_pb2.Contains(values=["answer"]))]
    run = (await runs.CreateRun(create_request(items=items, graders=graders))).run
    await watch_all(runs, run.id)
    by_name = {
        g.grader: g.agreement for g in (await runs.GetRun(pb.GetRunRequest(run_id=run.id))).run.aggregate.graders
    }
    assert by_name["exact"].both_passed == 1 and by_name["has-answer"].grader_passed_person_failed == 1


def test_an_agreement_with_nothing_compared_says_so() -> None:
    """Every labelled result errored: no percent of nothing, but how many errored."""
    from evalsvc_client.report import agreement_line

    [judge] = build_aggregate(["judge"], AggregateInputs([tally(ERROR, True, 4)], [], 0.0, [], [])).graders
    assert agreement_line(judge.agreement) == "was compared with people on no output (4 with a verdict errored)"
