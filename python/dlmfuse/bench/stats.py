"""Statistics of interleaved benchmark rounds: medians, interquartile ranges, paired ratios and the
verdict a ratio supports.

Every implementation of a workload is timed once per *round*, all of them in the same round, so
the ratio of two implementations is taken round by round (``peer time / dlmfuse time`` of the
same round) and a slow spell of the machine hits both sides of a ratio alike. A ratio is reported
as the median of its per-round values with their interquartile range (IQR, the middle half of
the rounds); its *spread* is the IQR's width relative to the median.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

#: A ratio whose IQR is wider than this fraction of its median is "noisy": it does not support
#: the ratio (e.g. 1.4x with an IQR of 0.9x-1.9x).
NOISY_SPREAD = 0.25
#: Fewer rounds than this give no usable quartiles.
MIN_ROUNDS = 3

FASTER, SLOWER, TIE, FEW_ROUNDS = "faster", "slower", "tie", "too few rounds"
NOISY_SUFFIX = " (noisy)"


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of a sample (``spread`` = IQR / median; 0 for a single value)."""

    median: float
    q1: float
    q3: float
    count: int

    @property
    def spread(self) -> float:
        return (self.q3 - self.q1) / self.median if self.median else float("inf")


def summarize(values: Sequence[float]) -> Summary:
    """Median and quartiles (inclusive method: the quartiles of 3 values are the midpoints between
    neighbours) of a non-empty sample."""
    if not values:
        raise ValueError("summarize: values must be non-empty, got []")
    data = sorted(values)
    median = statistics.median(data)
    if len(data) == 1:
        return Summary(median, median, median, 1)
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return Summary(median, q1, q3, len(data))


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios ``numerator[r] / denominator[r]`` of two implementations timed in the same
    rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired_ratios: both sides need one time per round, got {len(numerator)} "
                         f"and {len(denominator)}")
    return [n / d for n, d in zip(numerator, denominator)]


def is_noisy(ratio: Summary) -> bool:
    return ratio.spread > NOISY_SPREAD


def verdict(ratio: Summary) -> str:
    """What a ratio ``other time / dlmfuse time`` says about dlmfuse: ``faster`` (the IQR lies
    above 1), ``slower`` (below 1) or ``tie`` (the IQR contains 1), with `` (noisy)`` appended
    when the IQR is wider than NOISY_SPREAD of the median (the direction may hold, the value does
    not: rerun on a quiet machine or with more rounds); ``too few rounds`` below MIN_ROUNDS."""
    if ratio.count < MIN_ROUNDS:
        return FEW_ROUNDS
    direction = FASTER if ratio.q1 > 1.0 else SLOWER if ratio.q3 < 1.0 else TIE
    return direction + NOISY_SUFFIX if is_noisy(ratio) else direction


def spread_warning(what: str, ratio: Summary) -> Optional[str]:
    """A sentence when ``ratio`` is too noisy (or has too few rounds) to support its value."""
    if ratio.count < MIN_ROUNDS:
        return f"{what}: {ratio.count} round(s), no spread to judge the ratio by (use --repeats {MIN_ROUNDS} or more)"
    if is_noisy(ratio):
        return (f"{what}: IQR {ratio.q1:.3g}-{ratio.q3:.3g}x is {ratio.spread:.0%} of the ratio "
                f"{ratio.median:.3g}x (limit {NOISY_SPREAD:.0%}): too noisy to support it")
    return None
