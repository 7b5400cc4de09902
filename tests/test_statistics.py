"""fxrel.statistics: the bootstrap interval of a cell's mean and the "same as the best" mark, and the evaluation
table that carries them."""
from __future__ import annotations

import math

import torch

from fxrel.evaluation import EvalResult
from fxrel.statistics import Estimate, estimate, same_as_best


def test_the_interval_of_a_large_sample_is_the_normal_one():
    """For n = 400 the percentile interval of the mean is close to mean ± 1.96·s/√n (central limit theorem)."""
    values = torch.distributions.Exponential(1.0).sample((400,)).double().tolist()
    e = estimate(values)
    s = torch.tensor(values).std().item()
    assert e.n == 400 and e.low < e.mean < e.high
    assert math.isclose(e.half_width, 1.96 * s / 20, rel_tol=0.1)


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    g = torch.Generator().manual_seed(0)
    hits = sum(int(e.low <= 0.0 <= e.high) for e in
               (estimate(torch.randn(60, generator=g).tolist(), seed=k) for k in range(200)))
    assert 0.89 <= hits / 200 <= 0.99


def test_degenerate_samples_and_determinism():
    assert math.isnan(estimate([]).mean) and estimate([]).n == 0
    one = estimate([0.5, float("nan")])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.low)
    assert estimate([3.0] * 5) == Estimate(3.0, 3.0, 3.0, 5)
    assert estimate([0.1, 0.9, 0.4, 0.7]) == estimate([0.1, 0.9, 0.4, 0.7])
    assert estimate([0.1, 0.9, 0.4, 0.7], seed=1) != estimate([0.1, 0.9, 0.4, 0.7])


def test_same_as_best_marks_the_best_and_the_overlapping_intervals():
    best, close, far, missing = (Estimate(0.9, 0.85, 0.95, 9), Estimate(0.8, 0.7, 0.86, 9),
                                 Estimate(0.5, 0.4, 0.6, 9), Estimate(math.nan, math.nan, math.nan, 0))
    assert same_as_best([close, best, far, missing], higher_is_better=True) == [True, True, False, False]
    assert same_as_best([close, best, far, missing], higher_is_better=False) == [False, False, True, False]


def test_the_table_carries_intervals_and_marks_whatever_the_order_of_the_records():
    g = torch.Generator().manual_seed(1)
    pairs = [(i, c) for i in range(12) for c in range(2)]
    values = {"a": torch.rand(24, generator=g) * 0.2 + 0.8, "b": torch.rand(24, generator=g) * 0.2 + 0.79,
              "c": torch.rand(24, generator=g) * 0.2}
    forward, backward = EvalResult(metrics=("sparseness",)), EvalResult(metrics=("sparseness",))
    for method, v in values.items():
        forward.records[("m", method, "sparseness")] = {p: (float(x), True) for p, x in zip(pairs, v)}
        backward.records[("m", method, "sparseness")] = {p: (float(x), True)
                                                          for p, x in reversed(list(zip(pairs, v)))}
    assert forward.table() == backward.table() and forward.to_json() == backward.to_json()
    rows = {r["method"]: r for r in forward.to_json()["rows"]}
    assert rows["a"]["same_as_best"]["sparseness"] and rows["b"]["same_as_best"]["sparseness"]
    assert not rows["c"]["same_as_best"]["sparseness"]
    for r in rows.values():
        low, high = r["ci95"]["sparseness"]
        assert low <= r["sparseness"] <= high and r["pairs"]["sparseness"] == 24
    line = next(line for line in forward.table().splitlines() if line.startswith("m ") and " a " in line)
    e = forward.estimate("m", "a", "sparseness")
    assert f"{e.mean:.3f}±{e.half_width:.3f}*" in line
