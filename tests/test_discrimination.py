"""Class-discrimination metrics against literal per-sample computations."""
from __future__ import annotations

import math

import pytest
import torch

import fxrel
from fxrel.metrics import discrimination, map_correlation


def _literal_disc(m: torch.Tensor, target: torch.Tensor, others: torch.Tensor) -> float:
    others = others & ~target
    if not others.any():
        return math.nan
    on_t = float(m[target].clamp(min=0).sum())
    on_o = float(m[others].clamp(min=0).sum())
    return on_t / (on_t + on_o) if on_t + on_o > 0 else 0.0


def test_discrimination_is_the_targets_share_of_the_objects_positive_mass():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 9, 11, generator=g)
    target = torch.rand(6, 9, 11, generator=g) > 0.7
    others = torch.rand(6, 9, 11, generator=g) > 0.6
    others[2] = False            # a scene with one object: NaN
    maps[4] = -maps[4].abs()     # no positive mass on any object: 0
    target[:, 0, 0] = True       # masks must not be empty
    got = discrimination(maps, target, others)
    for i in range(6):
        expected = _literal_disc(maps[i], target[i], others[i])
        assert (math.isnan(expected) and math.isnan(got[i])) or got[i].item() == pytest.approx(expected, rel=1e-6)
    # background relevance does not count; a map equal on both objects scores 0.5
    flat = torch.zeros(1, 4, 4)
    flat[0, :, :2], flat[0, :, 2:] = 1.0, 1.0
    left, right = torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool)
    left[0, :2, :2], right[0, :2, 2:] = True, True
    assert discrimination(flat, left, right).item() == pytest.approx(0.5)


def test_map_correlation_is_pearsons_r_over_pixels():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    r = map_correlation(a, b, torch.tensor([True, True, False]))
    for i in range(2):
        expected = torch.corrcoef(torch.stack([a[i].flatten(), b[i].flatten()]))[0, 1]
        assert r[i].item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isnan(r[2])
    assert map_correlation(a, 2 * a + 1).sub(1).abs().max() < 1e-6
    assert map_correlation(a, torch.ones_like(a)).abs().max() == 0   # a constant map correlates 0
    with pytest.raises(fxrel.InputError, match="differ in shape"):
        map_correlation(a, b[:, :4])
