"""The noise of a table cell: the mean of a metric over (image, class) pairs with its 95% percentile-bootstrap
interval (Efron & Tibshirani 1993, ch. 13), and the cells whose interval overlaps the best one's.

The resamples are drawn from a stream keyed by ``(seed, "bootstrap", n)`` (:mod:`fxrel.streams`): every cell with the
same number of pairs resamples the same pair positions — a paired bootstrap across the methods of a table, whose
values are sorted by pair — and the interval does not depend on the order the pairs were computed in.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fxrel.streams import stream_seed

RESAMPLES = 1000   #: bootstrap resamples per cell
LEVEL = 0.95       #: the interval's coverage


@dataclass(frozen=True)
class Estimate:
    """``mean`` of ``n`` values with the bootstrap interval ``[low, high]`` (NaN for fewer than two values)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def overlaps(self, other: "Estimate") -> bool:
        """Whether the two intervals share a point (both finite)."""
        return self.low <= other.high and other.low <= self.high


def estimate(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """Mean of the finite ``values`` and its percentile-bootstrap interval: the ``(1 ± level)/2`` quantiles of the
    means of ``resamples`` resamples of the values with replacement."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    data = torch.tensor(finite, dtype=torch.float64)
    mean = float(data.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    generator = torch.Generator().manual_seed(stream_seed(seed, "bootstrap", n))
    means = data[torch.randint(n, (resamples, n), generator=generator)].mean(1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Estimate(mean, float(low), float(high), n)


def same_as_best(estimates: Sequence[Estimate], higher_is_better: bool) -> list[bool]:
    """For each estimate, whether it is the best mean or its interval overlaps the best one's (no mark for NaN)."""
    finite = [e for e in estimates if math.isfinite(e.mean)]
    if not finite:
        return [False] * len(estimates)
    best = (max if higher_is_better else min)(finite, key=lambda e: e.mean)
    return [math.isfinite(e.mean) and (e is best or e.mean == best.mean or e.overlaps(best)) for e in estimates]
