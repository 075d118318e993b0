"""The comparison statistics (evalsvc/runs/compare_stats.py) against values computed independently with
scipy, including the edge cases: no discordant pairs, all discordant, tiny n, one pair, no pairs."""

from __future__ import annotations

import math
import random

import pytest
from scipy import special, stats

from evalsvc.runs import compare_stats as cs


@pytest.mark.parametrize(
    ("a", "b", "x"), [(0.5, 0.5, 0.3), (2, 3, 0.5), (30, 0.5, 0.97), (1000, 1001, 0.5), (5, 40, 0.01)]
)
def test_regularized_beta_matches_scipy(a: float, b: float, x: float) -> None:
    assert cs.regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-300)


@pytest.mark.parametrize(
    ("improved", "regressed"),
    [(0, 0), (0, 1), (0, 5), (0, 6), (6, 0), (3, 3), (4, 3), (1, 9), (12, 30), (0, 40), (2000, 2100), (50_000, 49_000)],
)
def test_mcnemar_exact_p_matches_scipy_binomtest(improved: int, regressed: int) -> None:
    n = improved + regressed
    expected = 1.0 if n == 0 else stats.binomtest(min(improved, regressed), n, 0.5).pvalue
    assert cs.mcnemar_exact_p(improved, regressed) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_is_the_issue_formula_on_small_tables() -> None:
    """min(1, 2 P(X <= min(b, c))) written out with binomial coefficients."""
    for b in range(0, 12):
        for c in range(0, 12):
            n = b + c
            exact = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)
            assert cs.mcnemar_exact_p(b, c) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 200, 10_000])
@pytest.mark.parametrize("q", [0.975, 0.995, 0.6])
def test_student_t_quantile_matches_scipy(df: int, q: float) -> None:
    assert cs.student_t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)


@pytest.mark.parametrize(("successes", "n"), [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (517, 1000)])
def test_wilson_interval_matches_scipy(successes: int, n: int) -> None:
    expected = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    low, high = cs.wilson_interval(successes, n, stats.norm.ppf(0.975))
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)


def _newcombe_reference(a: int, improved: int, regressed: int, d: int, alpha: float) -> tuple[float, float]:
    """Newcombe (1998) method 10 written from the paper, on scipy's Wilson intervals: rows are the
    candidate (passed, failed), columns the baseline (passed, failed)."""
    n = a + improved + regressed + d
    level = 1 - alpha
    cand, base = a + improved, a + regressed
    ci1 = stats.binomtest(cand, n).proportion_ci(level, method="wilson")
    ci2 = stats.binomtest(base, n).proportion_ci(level, method="wilson")
    p1, p2 = cand / n, base / n
    denominator = cand * (n - cand) * base * (n - base)
    cross = a * d - improved * regressed
    if denominator == 0:
        phi = 0.0
    elif cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(denominator)
    elif cross < 0:
        phi = cross / math.sqrt(denominator)
    else:
        phi = 0.0
    low = p1 - p2 - math.sqrt((p1 - ci1.low) ** 2 - 2 * phi * (p1 - ci1.low) * (ci2.high - p2) + (ci2.high - p2) ** 2)
    high = p1 - p2 + math.sqrt((p2 - ci2.low) ** 2 - 2 * phi * (p2 - ci2.low) * (ci1.high - p1) + (ci1.high - p1) ** 2)
    return max(-1.0, low), min(1.0, high)


@pytest.mark.parametrize(
    "table",
    [
        (12, 2, 9, 30),
        (40, 0, 0, 10),
        (0, 5, 0, 0),
        (0, 0, 5, 0),
        (1, 0, 0, 0),
        (0, 0, 0, 1),
        (3, 4, 4, 3),
        (90, 1, 7, 2),
    ],
)
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_newcombe_interval_matches_an_independent_computation(table: tuple[int, int, int, int], alpha: float) -> None:
    a, improved, regressed, d = table
    low, high = cs.newcombe_paired_interval(a, improved, regressed, d, alpha)
    assert (low, high) == pytest.approx(_newcombe_reference(a, improved, regressed, d, alpha), abs=1e-12)
    estimate = (improved - regressed) / sum(table)
    assert -1.0 <= low <= estimate <= high <= 1.0


def test_newcombe_interval_is_antisymmetric_in_the_direction_of_change() -> None:
    low, high = cs.newcombe_paired_interval(20, 3, 11, 6, 0.05)
    mirrored = cs.newcombe_paired_interval(20, 11, 3, 6, 0.05)
    assert mirrored == pytest.approx((-high, -low), abs=1e-12)


def test_paired_t_interval_matches_scipy_ttest_rel() -> None:
    rng = random.Random(7)
    baseline = [rng.random() for _ in range(25)]
    candidate = [min(1.0, max(0.0, b + rng.uniform(-0.2, 0.3))) for b in baseline]
    tally = cs.PairTally()
    for b, c in zip(baseline, candidate, strict=True):
        tally.add(b >= 0.5, c >= 0.5, b, c)
    summary = cs.summarize(tally, 0.05)
    expected = stats.ttest_rel(candidate, baseline).confidence_interval(0.95)
    assert summary.score_delta_ci == pytest.approx((expected.low, expected.high), rel=1e-9)
    assert summary.mean_score_delta == pytest.approx(sum(candidate) / 25 - sum(baseline) / 25, abs=1e-12)


def test_no_discordant_pairs_is_no_significant_change() -> None:
    tally = cs.PairTally()
    for i in range(30):
        tally.add(i % 3 == 0, i % 3 == 0, 1.0 if i % 3 == 0 else 0.0, 1.0 if i % 3 == 0 else 0.0)
    summary = cs.summarize(tally, 0.05)
    assert summary.mcnemar_p_value == 1.0
    assert not summary.regressed and not summary.improved
    assert summary.pass_rate_delta == 0.0
    assert summary.score_delta_ci == (0.0, 0.0)  # every difference is 0
    low, high = summary.delta_ci
    assert low < 0 < high  # 30 pairs cannot exclude a small change


def test_all_discordant_pairs_regressed_is_significant() -> None:
    tally = cs.PairTally()
    for _ in range(10):
        tally.add(True, False, 1.0, 0.0)
    summary = cs.summarize(tally, 0.05)
    assert summary.mcnemar_p_value == pytest.approx(stats.binomtest(0, 10, 0.5).pvalue)
    assert summary.regressed and not summary.improved
    assert (summary.baseline_pass_rate, summary.candidate_pass_rate, summary.pass_rate_delta) == (1.0, 0.0, -1.0)
    assert summary.delta_ci[1] < 0


def test_tiny_n_cannot_be_significant() -> None:
    """Five discordant pairs all one way give p = 0.0625: not significant at 0.05, whatever the direction."""
    tally = cs.PairTally()
    for _ in range(5):
        tally.add(False, True, 0.0, 1.0)
    summary = cs.summarize(tally, 0.05)
    assert summary.mcnemar_p_value == pytest.approx(0.0625)
    assert not summary.improved
    assert cs.summarize(tally, 0.1).improved  # at alpha 0.1 it is


def test_one_pair_and_no_pairs_have_the_widest_intervals() -> None:
    one = cs.PairTally()
    one.add(True, True, 0.8, 0.6)
    summary = cs.summarize(one, 0.05)
    assert summary.score_delta_ci == (-1.0, 1.0)
    assert summary.mean_score_delta == pytest.approx(-0.2)
    empty = cs.summarize(cs.PairTally(), 0.05)
    assert empty.delta_ci == (-1.0, 1.0) and empty.score_delta_ci == (-1.0, 1.0)
    assert empty.mcnemar_p_value == 1.0 and empty.pass_rate_delta == 0.0
