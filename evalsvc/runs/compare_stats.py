"""Paired statistics for comparing two runs: pure functions, no I/O (docs/compare.md explains them).

A pair is one evaluation key (item, repetition, grader) graded in both runs. For the pass/fail
outcomes of n pairs, with b pairs that improved (failed -> passed) and c that regressed:
- the exact two-sided McNemar test: p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2);
- Newcombe's hybrid score interval (1998, method 10) for the difference of the paired proportions,
  built from the two Wilson score intervals and the phi correlation of the 2x2 table;
- for the scores, the paired t interval of the mean difference.
The distribution functions are implemented here (the regularized incomplete beta function by its
continued fraction) so the service needs no numerical library; tests check them against scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

_CF_MAX_ITERATIONS = 10_000
_CF_EPSILON = 1e-15
_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _CF_MAX_ITERATIONS + 1):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            step = d * c
            h *= step
        if abs(step - 1.0) < _CF_EPSILON:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def binomial_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return regularized_beta(n - k, k + 1, 0.5)


def mcnemar_exact_p(improved: int, regressed: int) -> float:
    """The exact two-sided McNemar p-value from the discordant pairs; 1 when there are none."""
    discordant = improved + regressed
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf_half(min(improved, regressed), discordant))


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, for q in (0.5, 1), by bisection (the CDF is monotonic)."""
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < q:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, df) < q:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (successes + z2 / 2.0) / (n + z2)
    half = z * math.sqrt(successes * (n - successes) / n + z2 / 4.0) / (n + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_interval(
    both_passed: int, improved: int, regressed: int, both_failed: int, alpha: float
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10, with his continuity-corrected phi) for
    candidate pass rate - baseline pass rate over paired outcomes; (-1, 1) with no pairs."""
    n = both_passed + improved + regressed + both_failed
    if n == 0:
        return -1.0, 1.0
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    candidate_passed, baseline_passed = both_passed + improved, both_passed + regressed
    p1, p2 = candidate_passed / n, baseline_passed / n
    l1, u1 = wilson_interval(candidate_passed, n, z)
    l2, u2 = wilson_interval(baseline_passed, n, z)
    margins = candidate_passed * (n - candidate_passed) * baseline_passed * (n - baseline_passed)
    phi = 0.0
    if margins > 0:
        cross = both_passed * both_failed - improved * regressed
        corrected = cross - n / 2.0 if cross > n / 2.0 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(margins)
    delta = p1 - p2
    below = (p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (p2 - l2) ** 2 - 2.0 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    return max(-1.0, delta - math.sqrt(max(0.0, below))), min(1.0, delta + math.sqrt(max(0.0, above)))


def paired_t_interval(n: int, mean: float, sum_squared_deviations: float, alpha: float) -> tuple[float, float]:
    """The 1 - alpha t interval of a mean difference in [-1, 1] from n differences (their mean and sum of
    squared deviations); (-1, 1) with fewer than 2, the mean itself when every difference is equal."""
    if n < 2:
        return -1.0, 1.0
    std_error = math.sqrt(sum_squared_deviations / (n - 1) / n)
    if std_error == 0.0:
        return mean, mean
    half = student_t_quantile(1.0 - alpha / 2.0, n - 1) * std_error
    return max(-1.0, mean - half), min(1.0, mean + half)


@dataclass
class PairTally:
    """Outcomes of counted pairs, accumulated one pair at a time (Welford's update for the score
    differences, so a long run loses no precision)."""

    both_passed: int = 0
    both_failed: int = 0
    improved: int = 0
    regressed: int = 0
    baseline_score_sum: float = 0.0
    candidate_score_sum: float = 0.0
    delta_mean: float = 0.0
    delta_squared_deviations: float = 0.0

    @property
    def pairs(self) -> int:
        """Counted pairs."""
        return self.both_passed + self.both_failed + self.improved + self.regressed

    def add(self, baseline_passed: bool, candidate_passed: bool, baseline_score: float, candidate_score: float) -> None:
        """Count one pair."""
        if baseline_passed and candidate_passed:
            self.both_passed += 1
        elif baseline_passed:
            self.regressed += 1
        elif candidate_passed:
            self.improved += 1
        else:
            self.both_failed += 1
        self.baseline_score_sum += baseline_score
        self.candidate_score_sum += candidate_score
        delta = candidate_score - baseline_score
        step = delta - self.delta_mean
        self.delta_mean += step / self.pairs
        self.delta_squared_deviations += step * (delta - self.delta_mean)


@dataclass(frozen=True)
class PairedSummary:
    """What a comparison reports for one grader (or all of them)."""

    baseline_pass_rate: float
    candidate_pass_rate: float
    pass_rate_delta: float
    delta_ci: tuple[float, float]
    mcnemar_p_value: float
    baseline_mean_score: float
    candidate_mean_score: float
    mean_score_delta: float
    score_delta_ci: tuple[float, float]
    regressed: bool  # significant at alpha, towards failing
    improved: bool  # significant at alpha, towards passing


def summarize(tally: PairTally, alpha: float) -> PairedSummary:
    """The statistics of a tally at significance level alpha (intervals at 1 - alpha)."""
    n = tally.pairs
    p_value = mcnemar_exact_p(tally.improved, tally.regressed)
    significant = p_value < alpha
    baseline_rate = (tally.both_passed + tally.regressed) / n if n else 0.0
    candidate_rate = (tally.both_passed + tally.improved) / n if n else 0.0
    return PairedSummary(
        baseline_pass_rate=baseline_rate,
        candidate_pass_rate=candidate_rate,
        pass_rate_delta=(tally.improved - tally.regressed) / n if n else 0.0,
        delta_ci=newcombe_paired_interval(tally.both_passed, tally.improved, tally.regressed, tally.both_failed, alpha),
        mcnemar_p_value=p_value,
        baseline_mean_score=tally.baseline_score_sum / n if n else 0.0,
        candidate_mean_score=tally.candidate_score_sum / n if n else 0.0,
        mean_score_delta=tally.delta_mean,
        score_delta_ci=paired_t_interval(n, tally.delta_mean, tally.delta_squared_deviations, alpha),
        regressed=significant and tally.regressed > tally.improved,
        improved=significant and tally.improved > tally.regressed,
    )
