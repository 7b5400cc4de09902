"""Randomisation sanity check: an explanation should change when the model's parameters are randomised."""
from __future__ import annotations

import copy
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxrel.errors import InputError
from fxrel.metrics.localisation import as_maps
from fxrel.metrics.perturbation import _check_targets, _pearson
from fxrel.metrics.robustness import ExplainFn, _explain


def _average_ranks(a: Tensor) -> Tensor:
    """Row-wise ranks of ``[B, n]`` values (float64), ties given their average rank (as scipy's ``rankdata``)."""
    rows, n = a.shape
    values, order = a.sort(1)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = (starts.cumsum(1) - 1 + torch.arange(rows, device=a.device)[:, None] * n).flatten()
    position = torch.arange(n, dtype=torch.float64, device=a.device).repeat(rows)
    total = torch.zeros(rows * n, dtype=torch.float64, device=a.device).scatter_add_(0, group, position)
    count = torch.zeros_like(total).scatter_add_(0, group, torch.ones_like(position))
    ranked = (total / count.clamp(min=1))[group].view(rows, n)
    return torch.empty_like(ranked).scatter_(1, order, ranked)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of ``[B, …]`` maps per sample: Pearson of the average ranks (0 if undefined)."""
    return _pearson(_average_ranks(a.flatten(1)), _average_ranks(b.flatten(1)))


def ssim(a: Tensor, b: Tensor, window: int = 7) -> Tensor:
    """SSIM (Wang et al., IEEE TIP 2004) of ``[B, H, W]`` maps per sample, as ``skimage.metrics.structural_similarity``
    with its defaults: ``window``² uniform windows inside the image, sample covariances, ``K1 = 0.01``,
    ``K2 = 0.03``, data range = max − min over both maps (1 for two equal constant maps)."""
    if min(a.shape[-2:]) < window:
        raise InputError(f"ssim needs maps of at least {window}×{window} pixels, got {tuple(a.shape[-2:])}")
    a, b = a.double().unsqueeze(1), b.double().unsqueeze(1)
    lo = torch.minimum(a.flatten(1).amin(1), b.flatten(1).amin(1))
    span = (torch.maximum(a.flatten(1).amax(1), b.flatten(1).amax(1)) - lo).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, window, stride=1)

    ma, mb = mean(a), mean(b)
    unbiased = window ** 2 / (window ** 2 - 1)
    va, vb = unbiased * (mean(a * a) - ma ** 2), unbiased * (mean(b * b) - mb ** 2)
    cov = unbiased * (mean(a * b) - ma * mb)
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return torch.where(span.flatten() > 0, s.flatten(1).mean(1), torch.ones_like(lo))


_SIMILARITIES = {"spearman": spearman, "pearson": lambda a, b: _pearson(a.flatten(1), b.flatten(1)), "ssim": ssim}


def _owns_state(module: nn.Module) -> bool:
    """Whether the module itself (not a child) holds a parameter or a buffer."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _randomisable(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """Modules with their own parameters or buffers and a ``reset_parameters()``, output side first."""
    found = {name: m for name, m in model.named_modules()
             if callable(getattr(m, "reset_parameters", None)) and _owns_state(m)}
    if not found:
        raise InputError("the model has no module with parameters and a reset_parameters() method to randomise")
    if layers is None:
        return list(reversed(found.items()))
    missing = [name for name in layers if name not in found]
    if missing:
        raise InputError(f"layers {missing} are not re-initialisable modules of the model; choose from {list(found)}")
    return [(name, found[name]) for name in layers]


def _reinitialise(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` with torch seeded by ``seed + 1`` (quantus ``MPRT(seed=seed)``'s scheme),
    leaving the caller's RNG state as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1)
        module.reset_parameters()


def cascading_randomisation(model: nn.Module, explain_fn: ExplainFn, x: Tensor, targets: Tensor,
                            similarity: Literal["spearman", "ssim", "pearson"] = "spearman", seed: int = 0,
                            layers: Sequence[str] | None = None, absolute: bool = True) -> dict[str, Tensor]:
    """Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency maps").
    Lower ↓ similarity = the explanation depends on the learned parameters (better).

    On a deep copy of ``model`` (the caller's model is never touched), re-initialise one more module at each step,
    from the output side down (reverse registration order of the modules that own parameters or buffers and have
    ``reset_parameters()`` — Conv, Linear, BatchNorm …; or the given ``layers`` in the given order), re-explain and
    compare with the original explanation: ``sim(|E_orig|, |E_step|)`` per sample (``absolute=False``: signed
    maps; ``[B, C, H, W]`` explanations are summed over channels first). Each module is re-initialised by its own
    ``reset_parameters()`` after seeding torch with ``seed + 1`` — quantus's ``MPRT(seed=seed)`` scheme, so a
    module's random weights do not depend on the other modules (a BatchNorm is reset to the identity).
    ``similarity``: Spearman rank correlation, Pearson correlation or SSIM (2-D, :func:`ssim`).
    Returns ``{module name: [B]}`` in randomisation order. The copy is re-initialised in place; fxrel's explainers
    (also the ones ``fxrel.explain`` caches per model object) follow the parameters' version counters and rebuild.
    """
    if similarity not in _SIMILARITIES:
        raise InputError(f"similarity must be one of {list(_SIMILARITIES)}, got {similarity!r}")
    measure = _SIMILARITIES[similarity]
    targets, _ = _check_targets(model, x, targets)

    def explain(m: nn.Module) -> Tensor:
        maps = as_maps(_explain(explain_fn, m, x, targets))
        return maps.abs() if absolute else maps

    reference = explain(model)
    randomised = copy.deepcopy(model)
    scores = {}
    for name, module in _randomisable(randomised, layers):
        _reinitialise(module, seed)
        scores[name] = measure(reference, explain(randomised)).to(reference.dtype)
    return scores
