"""Small statistics helpers: no numpy in the measuring path, so the figures do not depend on it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values (a failed scenario still renders)."""
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with thousands separators and about `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    return f"{value:,.{decimals}f}"


def spread(values: Sequence[float]) -> str:
    """min-max over the repetitions, the honest answer to "how noisy was this" with n = 3."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    return f"{fmt(min(finite))}-{fmt(max(finite))}"
