"""A run's summary and verdict, computed once when it finishes (counts stay live on the run row)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from evalsvc.runs.convert import pass_rate
from evalsvc.v1 import run_pb2


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def build_aggregate(
    grader_order: Sequence[str],
    grader_rows: Sequence[Mapping[str, Any]],
    latencies: Sequence[float],
    total_cost_usd: float,
) -> run_pb2.RunAggregate:
    """The RunAggregate from per-(grader, state) counts and score sums, latencies and cost."""
    per_grader = {name: run_pb2.GraderAggregate(grader=name) for name in grader_order}
    score_sums: dict[str, float] = dict.fromkeys(grader_order, 0.0)
    for row in grader_rows:
        agg = per_grader.setdefault(row["grader"], run_pb2.GraderAggregate(grader=row["grader"]))
        state, n = row["state"], int(row["n"])
        if state == run_pb2.RESULT_STATE_PASSED:
            agg.passed += n
        elif state == run_pb2.RESULT_STATE_FAILED:
            agg.failed += n
        elif state == run_pb2.RESULT_STATE_ERROR:
            agg.errored += n
            continue
        score_sums[row["grader"]] = score_sums.get(row["grader"], 0.0) + float(row["score_sum"] or 0.0)
    total_passed = total_failed = 0
    total_score = 0.0
    for name, agg in per_grader.items():
        agg.pass_rate = pass_rate(agg.passed, agg.failed)
        graded = agg.passed + agg.failed
        agg.mean_score = score_sums.get(name, 0.0) / graded if graded else 0.0
        total_passed += agg.passed
        total_failed += agg.failed
        total_score += score_sums.get(name, 0.0)
    ordered = sorted(latencies)
    graded_total = total_passed + total_failed
    return run_pb2.RunAggregate(
        pass_rate=pass_rate(total_passed, total_failed),
        mean_score=total_score / graded_total if graded_total else 0.0,
        graders=list(per_grader.values()),
        total_cost_usd=total_cost_usd,
        latency=run_pb2.LatencyStats(
            p50_ms=percentile(ordered, 50),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
            mean_ms=sum(ordered) / len(ordered) if ordered else 0.0,
        ),
    )


def verdict(passed: int, failed: int, errored: int, pass_threshold: float | None) -> tuple[int, bool | None, str, str]:
    """(final status, overall_passed, error code, error message) of a run whose evaluations all finished.

    A run whose every evaluation errored FAILED; otherwise it SUCCEEDED and passed when its pass
    rate (errors excluded) reaches pass_threshold percent (100 when unset)."""
    if passed + failed == 0:
        return (
            run_pb2.RUN_STATUS_FAILED,
            None,
            "ALL_EVALUATIONS_ERRORED",
            f"all {errored} evaluations errored; see the results' error_reason",
        )
    threshold = 100.0 if pass_threshold is None else pass_threshold
    return run_pb2.RUN_STATUS_SUCCEEDED, pass_rate(passed, failed) * 100 >= threshold - 1e-9, "", ""
