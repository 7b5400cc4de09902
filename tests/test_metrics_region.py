"""fxrel.metrics.region: region perturbation / ABPC and ROAD, against loop-based references, exact properties of a
linear model, the linear equations of the imputation, and quantus 0.6.0.

How quantus's settings are matched (read from its source):

* ``RegionPerturbation(patch_size=p, order="morf"|"lerf", regions_evaluation=P, normalise=False, abs=False,
  perturb_baseline=0.0)`` removes one patch per step (every channel) and returns the drops ``f_t(x) − f_t(x^{(s)})``
  for ``s = 1 … P``: our ``curve[:, :1] − curve[:, 1:]`` with ``patches_per_step=1`` and ``baseline=0.0``
  (``softmax=False``: logits, ``True``: softmax). It pads images a patch does not divide; we reject them. It orders
  the patches with numpy's unstable argsort, so the maps here have distinct patch sums. Measured: equal to the bit
  (0.0 relative) for logits and softmax.
* ``ROAD(percentages, noise=0, normalise=False, abs=False)`` imputes the ``⌊H·W·p/100⌋`` top pixels of the map (MoRF
  only; LeRF = MoRF of the negated map) and scores top-1 accuracy: our ``score="accuracy"``. It ranks the map
  broadcast to ``C·H·W`` features but imputes ``H·W`` pixels, so for ``C > 1`` it raises an IndexError; the check
  uses one-channel images. Its per-batch output is the batch mean, so it is called per image. Measured: identical
  curves. At the logit level ROAD is compared with quantus's ``noisy_linear_imputation`` fed to the same model:
  measured 4.5e-7 relative (float32 forward passes of differently rounded images), checked at 1e-5.
* ``noisy_linear_imputation(arr, indices, noise=0)`` solves the sparse system directly (scipy ``spsolve``);
  ours iterates (Jacobi-preconditioned CG in float64) to ``tol=1e-9``. Measured: at most 9.2e-9 of ``max|x|``
  (float64 inputs, 16–32 px, 5–99 % removed), checked at 2e-8. The equations hold to 2.4e-7 in float32 output.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxrel import metrics as M
from fxrel.errors import InputError, NumericalError
from fxrel.metrics.perturbation import _baseline
from fxrel.metrics.region import _linear_imputation
from tests.helpers import rel_error

S = 16


def tiny_cnn(channels: int = 3, classes: int = 5, size: int = S) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * size * size, classes)).eval()


def linear_model(channels: int = 3, classes: int = 4, size: int = S) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes)).eval()


def gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    return g.sum(1)


def images(batch: int, channels: int = 3, size: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def top_mask(maps: torch.Tensor, count: int) -> torch.Tensor:
    order = maps.flatten(1).argsort(1, descending=True)
    return torch.zeros(maps.flatten(1).shape, dtype=torch.bool).scatter_(1, order[:, :count], True).view_as(maps)


# ------------------------------------------------------------------------------------------------ region perturbation

def loop_region_perturbation(model, x, maps, targets, patch, per_step, base, score, descending):
    """One image at a time, plain loops: patch sums, a stable sort, patches copied from the baseline step by step."""
    curves, aucs = [], []
    for i in range(len(x)):
        height, width = maps[i].shape
        cells = []
        for py in range(height // patch):
            for px in range(width // patch):
                total = 0.0
                for yy in range(py * patch, (py + 1) * patch):
                    for xx in range(px * patch, (px + 1) * patch):
                        total += float(maps[i, yy, xx])
                cells.append((total, py, px))
        order = sorted(range(len(cells)), key=lambda c: cells[c][0], reverse=descending)   # stable, ties in order
        curve, fractions, removed = [], [], 0
        while True:
            image = x[i].clone()
            for c in order[:removed]:
                _, py, px = cells[c]
                rows, cols = slice(py * patch, (py + 1) * patch), slice(px * patch, (px + 1) * patch)
                image[:, rows, cols] = base[i][:, rows, cols]
            with torch.no_grad():
                logits = model(image[None])[0]
            value = {"logit": logits[targets[i]], "softmax": logits.softmax(0)[targets[i]],
                     "sigmoid": logits[targets[i]].sigmoid()}[score]
            curve.append(float(value))
            fractions.append(removed / len(cells))
            if removed == len(cells):
                break
            removed = min(removed + per_step, len(cells))
        aucs.append(sum((curve[s] + curve[s + 1]) / 2 * (fractions[s + 1] - fractions[s])
                        for s in range(len(curve) - 1)))
        curves.append(curve)
    return torch.tensor(curves, dtype=torch.float64), torch.tensor(aucs, dtype=torch.float64)


@pytest.mark.parametrize("patch, per_step, baseline, score", [(4, 1, "zero", "logit"), (4, 3, "blur", "softmax"),
                                                               (8, 1, 0.5, "sigmoid"), (2, 5, "zero", "logit")])
def test_region_perturbation_equals_loops(patch, per_step, baseline, score) -> None:
    model, x = tiny_cnn(), images(3)
    targets = torch.tensor([0, 3, 4])
    # integer maps: exact patch sums with many ties, so the tie order (stable, patch order) is checked too
    maps = torch.randint(-2, 3, (3, S, S), generator=torch.Generator().manual_seed(5)).float()
    out = M.region_perturbation(model, x, maps, targets, patch=patch, patches_per_step=per_step, baseline=baseline,
                                score=score, batch_size=7)
    base = _baseline(x, baseline)
    for order, descending in (("morf", True), ("lerf", False)):
        curve, auc = loop_region_perturbation(model, x, maps, targets, patch, per_step, base, score, descending)
        assert out[f"{order}_curve"].shape == curve.shape
        assert torch.allclose(out[f"{order}_curve"].double(), curve, rtol=1e-5, atol=1e-6)
        assert torch.allclose(out[order].double(), auc, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["abpc"], out["lerf"] - out["morf"])


def test_region_perturbation_linear_oracle() -> None:
    """A linear model with a zero baseline: removing patches R gives ``f_t(x) − Σ_{p∈R} c_p`` with ``c = W_t ⊙ x``
    summed over channels, so the map ``c`` makes the MoRF curve the pointwise lowest and the LeRF curve the highest
    over all patch orders (a greedy sort of additive terms), hence the largest ABPC, and ``−c`` the negated one."""
    model, x = linear_model(), images(4, seed=2)
    targets = torch.tensor([0, 1, 2, 3])
    weights = model[1].weight[targets].view(4, 3, S, S)
    oracle = (weights * x).sum(1).detach()
    kw = dict(patch=4, baseline="zero", score="logit")
    best = M.region_perturbation(model, x, oracle, targets, **kw)
    worst = M.region_perturbation(model, x, -oracle, targets, **kw)
    assert (best["abpc"] > 0).all() and torch.allclose(worst["abpc"], -best["abpc"], atol=1e-5)
    with torch.no_grad():
        clean = model(x).gather(1, targets[:, None])
    sums = oracle.view(4, 4, 4, 4, 4).sum((2, 4)).flatten(1).sort(1, descending=True).values
    expected = clean - torch.cat([torch.zeros(4, 1), sums.cumsum(1)], 1)
    assert torch.allclose(best["morf_curve"], expected, atol=1e-4)
    for seed in range(3):
        other = M.region_perturbation(model, x, torch.randn(4, S, S, generator=torch.Generator().manual_seed(seed)),
                                      targets, **kw)
        assert (best["morf_curve"] <= other["morf_curve"] + 1e-4).all()
        assert (best["lerf_curve"] >= other["lerf_curve"] - 1e-4).all()
        assert (best["abpc"] >= other["abpc"]).all()


def test_region_perturbation_quantus() -> None:
    quantus = pytest.importorskip("quantus")
    model, x = tiny_cnn(), images(4)
    targets = torch.tensor([0, 1, 2, 4])
    maps = gradient(model, x, targets)
    for order in ("morf", "lerf"):
        for softmax, score in ((False, "logit"), (True, "softmax")):
            metric = quantus.RegionPerturbation(patch_size=4, order=order, regions_evaluation=16, normalise=False,
                                                abs=False, perturb_baseline=0.0, disable_warnings=True)
            theirs = np.stack(metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(),
                                     a_batch=maps[:, None].numpy(), softmax=softmax))
            curve = M.region_perturbation(model, x, maps, targets, patch=4, score=score)[f"{order}_curve"]
            drops = curve[:, :1] - curve[:, 1:]
            assert rel_error(drops.double(), torch.as_tensor(theirs, dtype=torch.float64)) <= 1e-6, (order, score)


# --------------------------------------------------------------------------------------------------------- imputation

def neighbour_mean(v: torch.Tensor) -> torch.Tensor:
    """Independent reference: the 3×3 weighted mean of the in-image neighbours, by a convolution."""
    kernel = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=v.dtype)
    channels = v.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    weight = F.conv2d(torch.ones_like(v[:1, :1]).expand(1, channels, -1, -1), kernel, padding=1, groups=channels)
    return F.conv2d(v, kernel, padding=1, groups=channels) / weight


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_imputation_solves_the_equations(fraction) -> None:
    x = images(3, size=12, seed=4)
    removed = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(6)) < fraction
    removed[:, 0, 0] = removed[:, -1, :3] = True          # corners and borders: fewer neighbours
    removed[:, 5, 5] = False
    out = M.noisy_linear_imputation(x, removed, noise=0.0)
    assert out.dtype == x.dtype
    mask = removed.unsqueeze(1).expand_as(x)
    assert torch.equal(out[~mask], x[~mask])                                   # known pixels unchanged
    assert (out - neighbour_mean(out))[mask].abs().max() <= 1e-5              # each removed pixel = its mean


def test_imputation_equals_quantus() -> None:
    pytest.importorskip("quantus")
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation

    for size, seed in ((16, 0), (24, 1)):
        x = images(2, size=size, seed=seed).double()
        maps = F.avg_pool2d(images(2, 1, size, seed + 10), 5, 1, 2)[:, 0]          # smooth: large removed blobs
        for percent in (5, 50, 95):
            count = int(size * size * percent / 100)
            removed = top_mask(maps, count)
            ours = M.noisy_linear_imputation(x, removed, noise=0.0)
            for i in range(2):
                indices = maps[i].flatten().argsort(descending=True)[:count].numpy()
                theirs = torch.as_tensor(quantus_imputation(x[i].numpy(), indices, noise=0.0))
                assert (ours[i] - theirs).abs().max() <= 2e-8 * x[i].abs().max(), (size, percent)


def test_imputation_noise_and_streams() -> None:
    x = images(3, size=10, seed=7)
    removed = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(8)) < 0.5
    clean = M.noisy_linear_imputation(x, removed, noise=0.0)
    keys = [(0, 1), (5, 2), (9, 0)]
    noisy = M.noisy_linear_imputation(x, removed, noise=0.1, keys=keys)
    mask = removed.unsqueeze(1).expand_as(x)
    assert torch.equal(noisy[~mask], x[~mask])
    draws = (noisy - clean)[mask] / 0.1
    assert 0.8 < draws.std() < 1.2 and draws.mean().abs() < 0.2
    # the same row with the same key in another batch, at another position: the same noise
    again = M.noisy_linear_imputation(x[[2, 0]], removed[[2, 0]], noise=0.1, keys=[keys[2], keys[0]])
    assert torch.allclose(again, noisy[[2, 0]], atol=1e-6)
    other = M.noisy_linear_imputation(x[[0]], removed[[0]], noise=0.1, keys=[(1, 1)])
    assert not torch.allclose(other[0][mask[0]], noisy[0][mask[0]], atol=1e-3)


def test_imputation_does_not_return_unconverged_values() -> None:
    x = images(1, size=16, seed=9)
    removed = torch.ones(1, 16, 16, dtype=torch.bool)
    removed[0, 0, 0] = False                                       # one known pixel: a hard, far-reaching solve
    with pytest.raises(NumericalError, match="did not converge"):
        _linear_imputation(x, removed, 1e-9, 5)
    out = _linear_imputation(x, removed, 1e-9, None)
    assert torch.allclose(out[0, :, 1:, 1:], x[0, :, :1, :1].expand(-1, 15, 15), atol=1e-5)   # the harmonic fill
    with pytest.raises(InputError, match="at least one known pixel"):
        M.noisy_linear_imputation(x, torch.ones(1, 16, 16, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------------- ROAD

def test_road_curves_are_imputed_scores() -> None:
    """The logit curves equal the model on quantus's imputation (noise 0) of the top / bottom ``⌊H·W·p/100⌋`` pixels,
    the AUCs are trapezoids over p/100 and ``difference = lerf − morf``."""
    pytest.importorskip("quantus")
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation

    model, x = tiny_cnn(size=12), images(2, size=12, seed=11)
    targets = torch.tensor([1, 3])
    maps = gradient(model, x, targets)
    percentages = (10, 40, 75, 90)
    out = M.road(model, x, maps, targets, percentages=percentages, noise=0.0, score="logit", batch_size=3)
    for order, sign in (("morf", 1), ("lerf", -1)):
        expected = torch.zeros(2, len(percentages), dtype=torch.float64)
        for i in range(2):
            ranking = (sign * maps[i]).flatten().argsort(descending=True).numpy()
            for k, p in enumerate(percentages):
                imputed = quantus_imputation(x[i].numpy(), ranking[:int(144 * p / 100)], noise=0.0)
                with torch.no_grad():
                    expected[i, k] = model(torch.as_tensor(imputed, dtype=torch.float32)[None])[0, targets[i]]
        assert rel_error(out[f"{order}_curve"].double(), expected) <= 1e-5, order
        fractions = torch.tensor(percentages, dtype=out[order].dtype) / 100
        assert torch.allclose(out[order], torch.trapezoid(out[f"{order}_curve"], fractions))
    assert torch.equal(out["difference"], out["lerf"] - out["morf"])


def test_road_quantus() -> None:
    quantus = pytest.importorskip("quantus")
    model, x = tiny_cnn(channels=1), images(6, channels=1, seed=2)
    with torch.no_grad():
        targets = model(x).argmax(1)
    maps = gradient(model, x, targets)
    percentages = list(range(5, 100, 10))
    ours = M.road(model, x, maps, targets, percentages=percentages, noise=0.0)
    for order, sign in (("morf", 1), ("lerf", -1)):
        theirs = []
        for i in range(len(x)):             # quantus returns the batch mean per percentage: one image per call
            metric = quantus.ROAD(percentages=percentages, noise=0.0, normalise=False, abs=False,
                                  disable_warnings=True)
            scores = metric(model=model, x_batch=x[i:i + 1].numpy(), y_batch=targets[i:i + 1].numpy(),
                            a_batch=sign * maps[i:i + 1, None].numpy())
            theirs.append([scores[p] for p in percentages])
        theirs = torch.tensor(theirs, dtype=ours[f"{order}_curve"].dtype)
        assert 0 < theirs.mean() < 1                           # the predictions do flip: a meaningful comparison
        assert torch.equal(ours[f"{order}_curve"], theirs), order


def test_road_keyed_noise() -> None:
    """A row's noise follows its key: the same image and key in another batch and position give the same curves
    (also with another batch_size), another key gives other curves, and the noise does reach the model."""
    model, x = tiny_cnn(size=8), images(3, size=8, seed=12)
    targets = torch.tensor([0, 2, 4])
    maps = gradient(model, x, targets)
    kw = dict(percentages=(20, 60, 90), noise=0.05, score="logit", seed=3)
    first = M.road(model, x[:2], maps[:2], targets[:2], keys=[(7, 0), (3, 2)], **kw)
    second = M.road(model, x[[2, 0]], maps[[2, 0]], targets[[2, 0]], keys=torch.tensor([[9, 4], [7, 0]]),
                    batch_size=2, **kw)
    renamed = M.road(model, x[:1], maps[:1], targets[:1], keys=[(7, 1)], **kw)
    clean = M.road(model, x[:1], maps[:1], targets[:1], **{**kw, "noise": 0.0})
    for name in ("morf_curve", "lerf_curve"):
        assert torch.allclose(first[name][0], second[name][1], atol=1e-6)
        assert not torch.allclose(first[name][0], renamed[name][0], atol=1e-4)
        assert not torch.allclose(first[name][0], clean[name][0], atol=1e-4)
    reseeded = M.road(model, x[:1], maps[:1], targets[:1], keys=[(7, 0)], **{**kw, "seed": 4})
    assert not torch.allclose(first["morf_curve"][0], reseeded["morf_curve"][0], atol=1e-4)


# --------------------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs, match", [
    (dict(patch=5), "divides"), (dict(patch=32), "divides"), (dict(patch=0), "divides"), (dict(patch=2.0), "divides"),
    (dict(patches_per_step=0), "patches_per_step"), (dict(patch=8, patches_per_step=5), r"\[1, 4\]"),
    (dict(score="accuracy"), "score"), (dict(baseline="mean"), "baseline"),
    (dict(baseline=torch.zeros(5)), "broadcast"), (dict(baseline=None), "baseline"), (dict(baseline=[0.0]), "baseline"),
    (dict(batch_size=0), "batch_size"),
])
def test_region_perturbation_bad_input(kwargs, match) -> None:
    model, x = tiny_cnn(), images(2)
    with pytest.raises(InputError, match=match):
        M.region_perturbation(model, x, torch.randn(2, S, S), torch.tensor([0, 1]), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(percentages=()), "percentages"), (dict(percentages=(0, 50)), r"\(0, 100\)"),
    (dict(percentages=(50, 100)), r"\(0, 100\)"), (dict(percentages=(30, 20)), "increasing"),
    (dict(percentages=(10, 10)), "increasing"), (dict(percentages=("a",)), "numbers"), (dict(percentages=5), "numbers"),
    (dict(score="probability"), "score"), (dict(noise=-0.1), "noise"), (dict(noise=float("nan")), "noise"),
    (dict(tol=0.0), "tol"), (dict(max_iter=0), "max_iter"), (dict(keys=[(0, 0)]), "keys"),
])
def test_road_bad_input(kwargs, match) -> None:
    model, x = tiny_cnn(size=8), images(2, size=8)
    with pytest.raises(InputError, match=match):
        M.road(model, x, torch.randn(2, 8, 8), torch.tensor([0, 1]), **kwargs)


def test_imputation_bad_input() -> None:
    x = images(2, size=8)
    with pytest.raises(InputError, match="removed"):
        M.noisy_linear_imputation(x, torch.zeros(2, 8, 7, dtype=torch.bool))
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        M.noisy_linear_imputation(x[0], torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="NaN"):
        M.noisy_linear_imputation(x.clone().fill_(float("nan")), torch.zeros(2, 8, 8, dtype=torch.bool))
