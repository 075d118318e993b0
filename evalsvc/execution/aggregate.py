"""A run's summary and verdict, computed once when it ends (counts stay live on the run row)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.messages.convert import pass_rate
from evalsvc.store import runs as run_store
from evalsvc.store.runs import AggregateInputs
from evalsvc.v1 import run_pb2


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _std_error(n: int, total: float, squares: float) -> float:
    """Standard error of a mean from count, sum and sum of squares."""
    if n < 2:
        return 0.0
    variance = max(0.0, (squares - total * total / n) / (n - 1))
    return math.sqrt(variance / n)


def agree(agreement: run_pb2.HumanAgreement, state: int, person_passed: bool, n: int) -> None:
    """Count `n` results of one grader in `state` that a person judged `person_passed`."""
    if state == run_pb2.RESULT_STATE_ERROR:
        agreement.errored += n
    elif state == run_pb2.RESULT_STATE_PASSED:
        if person_passed:
            agreement.both_passed += n
        else:
            agreement.grader_passed_person_failed += n
    elif state == run_pb2.RESULT_STATE_FAILED:
        if person_passed:
            agreement.grader_failed_person_passed += n
        else:
            agreement.both_failed += n


def settle(agreement: run_pb2.HumanAgreement) -> None:
    """Accuracy and Cohen's kappa from the counts: kappa = (p_o - p_e) / (1 - p_e), p_e the agreement
    chance gives from each side's own pass rate; 0 where chance explains everything (p_e = 1)."""
    a, d = agreement.both_passed, agreement.both_failed
    b, c = agreement.grader_passed_person_failed, agreement.grader_failed_person_passed
    n = a + b + c + d
    if not n:
        return
    observed = (a + d) / n
    chance = ((a + b) * (a + c) + (c + d) * (b + d)) / (n * n)
    agreement.accuracy = observed
    agreement.cohen_kappa = (observed - chance) / (1 - chance) if chance < 1 else 0.0


def build_aggregate(grader_order: Sequence[str], inputs: AggregateInputs) -> run_pb2.RunAggregate:
    """The RunAggregate of a run's results: per grader and overall pass rate, mean score and its
    standard error (errors excluded), agreement with people's verdicts, mean weighted item score,
    latency percentiles, costs (without what came from the response cache) and what the cache saved."""
    per_grader = {name: run_pb2.GraderAggregate(grader=name) for name in grader_order}
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in grader_order}
    scoring_cost = 0.0
    cache_hits, cost_saved = inputs.cached_outputs, inputs.target_cost_saved_usd
    for tally in inputs.grader_tallies:
        name = tally.grader
        agg = per_grader.setdefault(name, run_pb2.GraderAggregate(grader=name))
        scoring_cost += tally.scoring_cost
        cost_saved += tally.scoring_saved
        cache_hits += tally.verdict_hits
        if tally.human_verdict is not None:
            agree(agg.agreement, tally.state, tally.human_verdict, tally.n)
        if tally.state == run_pb2.RESULT_STATE_PASSED:
            agg.passed += tally.n
        elif tally.state == run_pb2.RESULT_STATE_FAILED:
            agg.failed += tally.n
        elif tally.state == run_pb2.RESULT_STATE_ERROR:
            agg.errored += tally.n
            continue
        totals = sums.setdefault(name, [0.0, 0.0])
        totals[0] += tally.score_sum
        totals[1] += tally.score_sq_sum
    passed = failed = 0
    score_total = square_total = 0.0
    for name, agg in per_grader.items():
        graded = agg.passed + agg.failed
        total, squares = sums.get(name, [0.0, 0.0])
        agg.pass_rate = pass_rate(agg.passed, agg.failed)
        agg.mean_score = total / graded if graded else 0.0
        agg.std_error = _std_error(graded, total, squares)
        if agg.HasField("agreement"):
            settle(agg.agreement)
        passed, failed = passed + agg.passed, failed + agg.failed
        score_total, square_total = score_total + total, square_total + squares
    ordered = sorted(inputs.latencies)
    memory = sorted(inputs.memory_mib)
    graded_total = passed + failed
    items = inputs.item_scores
    return run_pb2.RunAggregate(
        pass_rate=pass_rate(passed, failed),
        mean_score=score_total / graded_total if graded_total else 0.0,
        std_error=_std_error(graded_total, score_total, square_total),
        graders=list(per_grader.values()),
        total_cost_usd=inputs.target_cost_usd,
        scoring_cost_usd=scoring_cost,
        mean_item_score=sum(items) / len(items) if items else 0.0,
        latency=run_pb2.LatencyStats(
            p50_ms=percentile(ordered, 50),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
            mean_ms=sum(ordered) / len(ordered) if ordered else 0.0,
        ),
        memory=run_pb2.MemoryStats(
            mean_mib=sum(memory) / len(memory) if memory else 0.0,
            p50_mib=percentile(memory, 50),
            p95_mib=percentile(memory, 95),
            max_mib=memory[-1] if memory else 0.0,
            samples=len(memory),
        ),
        cache_hits=cache_hits,
        cost_saved_usd=cost_saved,
    )


def verdict(
    passed: int, failed: int, errored: int, pass_threshold: float | None, max_error_rate: float | None = None
) -> tuple[int, bool | None, str, str]:
    """(final status, overall_passed, error code, error message) of a run whose evaluations all finished.

    A run whose every evaluation errored FAILED; otherwise it SUCCEEDED and passed when its pass
    rate (errors excluded) reaches pass_threshold percent (100 when unset) and at most max_error_rate
    percent of its evaluations errored. Without that second bar a run whose 9 evaluations of 10
    errored passed on the one that was graded: a CI gate passed on evidence it did not have. None: a
    run created before the bar existed, judged as it was then."""
    if passed + failed == 0:
        return (
            run_pb2.RUN_STATUS_FAILED,
            None,
            "ALL_EVALUATIONS_ERRORED",
            f"all {errored} evaluations errored; see the results' error_reason",
        )
    threshold = 100.0 if pass_threshold is None else pass_threshold
    rate_reached = pass_rate(passed, failed) * 100 >= threshold - 1e-9
    errors_allowed = max_error_rate is None or errored * 100 <= max_error_rate * (passed + failed + errored) + 1e-9
    return run_pb2.RUN_STATUS_SUCCEEDED, rate_reached and errors_allowed, "", ""


async def aggregate_so_far(conn: AsyncConnection, run_id: str, grader_order: Sequence[str]) -> bytes:
    """The serialized aggregate of the results a run has recorded, for a run that ends before all its
    evaluations ran (cancelled, or failed early): read and built as a finishing run's."""
    inputs = await run_store.aggregate_inputs(conn, [run_id])
    return build_aggregate(grader_order, inputs[run_id]).SerializeToString()
