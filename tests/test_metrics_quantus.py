"""fxrel.metrics against quantus 0.6 on the same inputs (a tiny random CNN, batch 4, float32), to 1e-5 relative.

How the definitions are aligned (read from quantus's source):

* ``AttributionLocalisation(abs=False, normalise=False, positive_attributions=True)`` is Σ⁺_in / (Σ⁺ + 1e-9): our
  unweighted ``attribution_localisation``. Its ``weighted=True`` is NOT compared: quantus multiplies by
  ``|mask| / x_batch[2:].size`` — the size of the batch minus its first two samples, and |mask|/size instead of the
  paper's size/|mask| — so it cannot match Kohlbrenner et al.'s ``μ · (H·W)/|mask|`` that we implement.
* ``PointingGame`` (any tied maximum inside the mask is a hit) equals our ``pointing_game(tolerance=0)`` on
  non-constant maps; quantus has no tolerance and counts a constant map as a hit (every pixel is a maximum), which
  we count as a miss, so constant maps are left out.
* ``Sparseness`` normalises by max|a| over the whole batch by default; with ``normalise_axes=(1, 2, 3)`` it
  normalises per sample, as ours does (then both add quantus's 1e-7).
* ``FaithfulnessCorrelation`` draws its subsets over the C·H·W input features, ours over pixels (all channels of
  a pixel at once): identical for one-channel inputs, so that check uses C = 1. Its subsets come from numpy's
  global RNG (``np.random.choice(n, s, replace=False)`` per sample and run); we replay those draws into our
  ``indices=`` and reseed numpy before quantus runs.
* ``MaxSensitivity``'s noise is ``np.random.uniform(-r, r, (B, C·H·W))`` per sample; we replay it into ``noise=``.
  Quantus adds float64 noise to float32 inputs in numpy, we add the float32 noise in torch: a rounding difference.
* ``MPRT``: quantus re-initialises every module with ``reset_parameters`` (top-down, ``torch.manual_seed(seed + 1)``
  before each), explains and correlates |explanations|; ours uses the same scheme and the same ``seed``.
  Compared for Spearman and Pearson. SSIM is NOT compared: quantus passes the flattened explanations to skimage,
  i.e. a 1-D SSIM along the flattened vector, while ours is the 2-D SSIM of the maps (checked against skimage in
  test_metrics.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxrel import metrics as M
from tests.helpers import rel_error

quantus = pytest.importorskip("quantus")

RTOL = 1e-5
B, S = 4, 16


def tiny_cnn(channels: int = 3, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * S * S, classes)).eval()


def gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    return g.sum(1)


def quantus_gradient(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs) -> np.ndarray:
    """The same explain function in quantus's calling convention (numpy in, numpy out)."""
    return gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()


@pytest.fixture(scope="module")
def batch() -> dict:
    model = tiny_cnn()
    x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 4])
    maps = gradient(model, x, targets)
    masks = M.box_masks(torch.tensor([[2, 2, 8, 8], [0, 0, 16, 4], [5, 5, 12, 14], [10, 3, 16, 9]]), S, S)
    return {"model": model, "x": x, "targets": targets, "maps": maps, "masks": masks,
            "q": dict(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=maps[:, None].numpy())}


def close(ours: torch.Tensor, theirs) -> None:
    theirs = torch.as_tensor(np.asarray(theirs, dtype=np.float64))
    assert rel_error(ours.double(), theirs) <= RTOL, (ours, theirs)


def test_attribution_localisation(batch) -> None:
    metric = quantus.AttributionLocalisation(abs=False, normalise=False, positive_attributions=True,
                                             disable_warnings=True)
    theirs = metric(**batch["q"], s_batch=batch["masks"][:, None].numpy().astype(np.float32))
    close(M.attribution_localisation(batch["maps"], batch["masks"]), theirs)


def test_attribution_localisation_weighted() -> None:
    pytest.skip("quantus weights by |mask| / x_batch[2:].size (batch-dependent, inverted), not (H·W)/|mask|")


def test_pointing_game(batch) -> None:
    maps = batch["maps"].clone()
    maps[1] = 0.0
    maps[1, 1, 3] = maps[1, 12, 12] = 1.0  # tied maxima, one inside the mask (rows 0–3)
    maps[2] = 0.0
    maps[2, 4, 4] = maps[2, 15, 15] = 1.0  # tied maxima, both outside
    q = {**batch["q"], "a_batch": maps[:, None].numpy()}
    theirs = quantus.PointingGame(disable_warnings=True)(**q, s_batch=batch["masks"][:, None].numpy().astype(float))
    ours = M.pointing_game(maps, batch["masks"])
    assert ours[1] == 1.0 and ours[2] == 0.0
    close(ours, theirs)


def test_sparseness(batch) -> None:
    metric = quantus.Sparseness(normalise_func_kwargs={"normalise_axes": (1, 2, 3)}, disable_warnings=True)
    close(M.sparseness(batch["maps"]), metric(**batch["q"]))


def test_faithfulness_correlation() -> None:
    model = tiny_cnn(channels=1)
    x = torch.randn(B, 1, S, S, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([3, 0, 1, 2])
    maps = gradient(model, x, targets)
    runs, size = 30, 20
    np.random.seed(3)
    indices = np.stack([np.stack([np.random.choice(S * S, size, replace=False) for _ in range(B)])
                        for _ in range(runs)])
    np.random.seed(3)
    metric = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=size, perturb_baseline=0.0, abs=False,
                                             normalise=False, return_aggregate=False, disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=maps[:, None].numpy())
    close(M.faithfulness_correlation(model, x, maps, targets, indices=torch.from_numpy(indices)), theirs)


def test_max_sensitivity(batch) -> None:
    samples, radius = 6, 0.2
    np.random.seed(5)
    noise = np.stack([np.random.uniform(-radius, radius, size=(B, 3 * S * S)) for _ in range(samples)])
    np.random.seed(5)
    metric = quantus.MaxSensitivity(nr_samples=samples, lower_bound=radius, disable_warnings=True)
    theirs = metric(**batch["q"], explain_func=quantus_gradient)
    noise = torch.from_numpy(noise).float().view(samples, B, 3, S, S)
    close(M.max_sensitivity(gradient, batch["model"], batch["x"], batch["targets"], noise=noise), theirs)


@pytest.mark.parametrize("similarity", ["spearman", "pearson"])
def test_model_parameter_randomisation(batch, similarity: str) -> None:
    func = {"spearman": quantus.similarity_func.correlation_spearman,
            "pearson": quantus.similarity_func.correlation_pearson}[similarity]
    metric = quantus.MPRT(similarity_func=func, seed=7, disable_warnings=True)
    theirs = metric(**{**batch["q"], "a_batch": None}, explain_func=quantus_gradient)
    ours = M.cascading_randomisation(batch["model"], gradient, batch["x"], batch["targets"], similarity=similarity,
                                     seed=7)
    assert list(ours) == [k for k in theirs if k != "original"]
    for layer, scores in ours.items():
        close(scores, theirs[layer])
