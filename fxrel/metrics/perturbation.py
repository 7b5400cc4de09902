"""Perturbation metrics: does hiding or keeping the attributed pixels change the model's output as the map says?

All forward passes over perturbed copies run under ``torch.no_grad()`` in chunks of ``batch_size`` images, built
chunk by chunk on the inputs' device. Also home of the model-side helpers the other metric modules share
(``_check_targets``, ``_pearson``).
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from fxrel.errors import InputError
from fxrel.imageops import gaussian_blur, minmax_normalise
from fxrel.metrics.localisation import _check_maps
from fxrel.streams import Key, row_generators

Score = Literal["softmax", "sigmoid", "logit", "accuracy"]


def _check_targets(model: nn.Module, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(targets, logits)``: targets as a ``[B]`` index tensor on ``x``'s device, checked against ``model(x)``."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise InputError(f"x must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    targets = torch.as_tensor(targets, device=x.device)
    if targets.dim() != 1 or targets.shape[0] != x.shape[0]:
        raise InputError(f"targets must be [B] = [{x.shape[0]}] class indices, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise InputError(f"targets must be integer class indices, got dtype {targets.dtype}")
    with torch.no_grad():
        logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise InputError(f"the model must return logits [B, K], got shape {tuple(logits.shape)}")
    bad = (targets < 0) | (targets >= logits.shape[1])
    if bad.any():
        raise InputError(f"targets {targets[bad].tolist()} out of range for the model's {logits.shape[1]} outputs")
    return targets.long(), logits


def _prepare(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Checked ``(maps, targets, clean logits)`` for a metric that perturbs ``x`` by ``maps``."""
    targets, logits = _check_targets(model, x, targets)
    maps = _check_maps(maps, x.shape[0], tuple(x.shape[2:])).to(x.device)
    return maps, targets, logits


def _check_score(score: str, allowed: Sequence[str]) -> None:
    if score not in allowed:
        raise InputError(f"score must be one of {list(allowed)}, got {score!r}")


def _score(logits: Tensor, targets: Tensor, score: str) -> Tensor:
    """Per-row score of the target class: its logit, sigmoid, softmax probability or top-1 hit (``accuracy``)."""
    column = targets[:, None]
    if score == "logit":
        return logits.gather(1, column).squeeze(1)
    if score == "sigmoid":
        return logits.gather(1, column).squeeze(1).sigmoid()
    if score == "softmax":
        return logits.softmax(1).gather(1, column).squeeze(1)
    return (logits.argmax(1) == targets).to(logits.dtype)


def _chunked_logits(model: nn.Module, make: Callable[[Tensor], Tensor], total: int, batch_size: int,
                    device: torch.device) -> Tensor:
    """``model(make(j))`` for the image indices ``j = 0 … total−1``, ``batch_size`` images per forward pass."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    with torch.no_grad():
        for start in range(0, total, batch_size):
            out.append(model(make(torch.arange(start, min(start + batch_size, total), device=device))))
    return torch.cat(out)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation (in float64); 0 where a row is constant and the correlation is undefined."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    den = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    safe = den.where(den > 0, torch.ones_like(den))
    return torch.where(den > 0, (a * b).sum(-1) / safe, torch.zeros_like(den))


def _baseline(x: Tensor, baseline: float | str | Tensor, blur_sigma: float = 5.0, blur_size: int = 11) -> Tensor:
    """The replacement image ``[B, C, H, W]``: ``"zero"``, ``"blur"`` (Gaussian), a number or a broadcastable tensor."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros_like(x)
        if baseline == "blur":
            return gaussian_blur(x, blur_size, blur_sigma, border="replicate")
        raise InputError(f'baseline must be "zero", "blur", a number or a tensor, got {baseline!r}')
    value = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return value.expand_as(x)
    except RuntimeError:
        raise InputError(f"baseline of shape {tuple(value.shape)} does not broadcast to x {tuple(x.shape)}") from None


def _ranks(maps: Tensor, descending: bool) -> Tensor:
    """Position of every pixel in the (stable) ordering of its map, ``[B, H, W]`` long."""
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=descending, stable=True)
    position = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, position).view_as(maps)


def _rank_curve(model: nn.Module, ranks: Tensor, counts: Tensor, first: Tensor, rest: Tensor, targets: Tensor,
                score: str, batch_size: int) -> Tensor:
    """Scores ``[B, S]`` of ``where(rank < n_k, first, rest)`` for the pixel counts ``n_0 … n_{S−1}``."""
    batch = ranks.shape[0]

    def make(j: Tensor) -> Tensor:
        k, b = j // batch, j % batch
        take_first = (ranks[b] < counts[k].view(-1, 1, 1)).unsqueeze(1)
        return torch.where(take_first, first[b], rest[b])

    logits = _chunked_logits(model, make, counts.numel() * batch, batch_size, ranks.device)
    return _score(logits, targets.repeat(counts.numel()), score).view(-1, batch).T


def _random_subsets(pixels: int, size: int, runs: int, seed: int, keys: Sequence[Key] | Tensor | None,
                    batch: int) -> Tensor:
    """``[runs, batch, size]`` pixel indices: for row ``b``, ``runs`` uniform subsets drawn without replacement
    (the first ``size`` of the argsort of ``runs × pixels`` uniforms) from the keyed stream
    ``(seed, "faithfulness_correlation", keys[b])`` (:mod:`fxrel.streams`)."""
    generators = row_generators(seed, "faithfulness_correlation", keys, batch)
    rows = [torch.rand(runs, pixels, generator=g).argsort(1)[:, :size] for g in generators]
    return torch.stack(rows, 1)


def _subset_indices(indices: Tensor | None, subset_size: int | float, runs: int, seed: int,
                    keys: Sequence[Key] | Tensor | None, batch: int, pixels: int, device: torch.device) -> Tensor:
    """The checked ``[runs, B, s]`` pixel subsets of faithfulness correlation (given or drawn)."""
    if indices is None:
        size = round(subset_size * pixels) if isinstance(subset_size, float) else subset_size
        if not 1 <= size < pixels:
            raise InputError(f"subset_size gives {size} pixels; it must be in [1, {pixels - 1}] for {pixels} pixels")
        if runs < 2:
            raise InputError(f"runs must be >= 2 for a correlation, got {runs}")
        indices = _random_subsets(pixels, size, runs, seed, keys, batch)
    if indices.dim() != 3 or indices.shape[1] != batch or indices.shape[0] < 2:
        raise InputError(f"indices must be [runs >= 2, B = {batch}, subset size], got {tuple(indices.shape)}")
    if indices.min() < 0 or indices.max() >= pixels:
        raise InputError(f"indices must be flat pixel indices in [0, {pixels})")
    return indices.to(device=device, dtype=torch.long)


def faithfulness_correlation(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor,
                             subset_size: int | float = 0.05, runs: int = 50, baseline: float | Tensor = 0.0,
                             seed: int = 0, batch_size: int = 256, indices: Tensor | None = None,
                             keys: Sequence[Key] | Tensor | None = None) -> Tensor:
    """Faithfulness correlation (Bhatt et al., IJCAI 2020, "Evaluating and aggregating feature-based model
    explanations"). Higher ↑.

    For ``runs`` random pixel subsets ``S`` (all channels of a pixel replaced by ``baseline``):
    ``corr_S( Σ_{p∈S} M_p , f_t(x) − f_t(x_{S←baseline}) )`` with ``f_t`` the target logit, Pearson over the runs.
    Defaults for small images: ``subset_size=0.05`` (a float is a fraction of the ``H·W`` pixels, an int a count)
    and ``runs=50`` (the paper/quantus: 224 pixels of 224², 100 runs). The subsets of row ``b`` come from its own
    stream keyed ``(seed, keys[b])`` (:mod:`fxrel.streams`; ``keys`` default: the row positions), so a row scores the
    same in any batch, process or device when it keeps its key. ``indices`` (``[runs, B, s]`` flat pixel indices)
    replaces the random draw. A constant series (e.g. an all-zero map) has no correlation: 0.
    """
    maps, targets, logits = _prepare(model, x, maps, targets)
    batch, _, height, width = x.shape
    pixels = height * width
    indices = _subset_indices(indices, subset_size, runs, seed, keys, batch, pixels, x.device)
    base = _baseline(x, baseline)
    runs = indices.shape[0]

    def make(j: Tensor) -> Tensor:
        r, b = j // batch, j % batch
        hide = torch.zeros(j.numel(), pixels, dtype=torch.bool, device=x.device).scatter_(1, indices[r, b], True)
        return torch.where(hide.view(-1, 1, height, width), base[b], x[b])

    hidden = _chunked_logits(model, make, runs * batch, batch_size, x.device)
    drops = _score(logits, targets, "logit") - _score(hidden, targets.repeat(runs), "logit").view(runs, batch)
    sums = maps.flatten(1).expand(runs, -1, -1).gather(2, indices).sum(2)
    return _pearson(sums.T, drops.T).to(maps.dtype)


def insertion_deletion(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor, steps: int = 50,
                       baseline: Literal["blur", "zero"] | Tensor = "blur",
                       score: Literal["softmax", "sigmoid", "logit"] = "softmax", batch_size: int = 256,
                       blur_sigma: float = 5.0, blur_size: int = 11) -> dict[str, Tensor]:
    """Insertion ↑ and deletion ↓ AUC (Petsiuk et al., BMVC 2018, "RISE").

    Pixels ordered from most to least relevant; after ``n_k = ⌊k·H·W/steps⌋`` of them (k = 0 … steps), deletion
    scores ``x`` with those pixels replaced by the baseline, insertion the baseline with those pixels of ``x``.
    AUC = trapezoid rule of the score over the fraction ``n_k/(H·W)`` ∈ [0, 1]. ``score`` of the target class:
    ``"softmax"`` (paper) or ``"sigmoid"`` (multi-label models) or ``"logit"``. ``baseline``: ``"blur"`` (Gaussian,
    σ = 5, 11×11 as RISE's insertion substrate; RISE deletes to zeros: ``"zero"``) or a broadcastable tensor.
    Returns ``{"insertion", "deletion": [B], "insertion_curve", "deletion_curve": [B, steps+1]}``.
    """
    _check_score(score, ("softmax", "sigmoid", "logit"))
    maps, targets, _ = _prepare(model, x, maps, targets)
    pixels = maps[0].numel()
    if not 1 <= steps <= pixels:
        raise InputError(f"steps must be in [1, {pixels}] (the number of pixels), got {steps}")
    base = _baseline(x, baseline, blur_sigma, blur_size)
    counts = torch.arange(steps + 1, device=x.device) * pixels // steps
    fractions = counts.to(maps.dtype) / pixels
    ranks = _ranks(maps, descending=True)
    insertion = _rank_curve(model, ranks, counts, x, base, targets, score, batch_size)
    deletion = _rank_curve(model, ranks, counts, base, x, targets, score, batch_size)
    return {"insertion": torch.trapezoid(insertion, fractions), "deletion": torch.trapezoid(deletion, fractions),
            "insertion_curve": insertion, "deletion_curve": deletion}


def negative_perturbation(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor,
                          fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                          baseline: float | Tensor = 0.0,
                          score: Literal["accuracy", "softmax", "sigmoid"] = "accuracy",
                          batch_size: int = 256) -> dict[str, Tensor]:
    """Negative perturbation AUC (Gur et al., AAAI 2021, AGF; as in Chefer et al. 2021). Higher ↑.

    The ``round(f·H·W)`` LEAST relevant pixels are replaced by ``baseline`` for each fraction ``f``; the curve is the
    target's score at ``f = 0, fractions…`` (``"accuracy"``: 1 while the target is still the arg-max class) and
    ``auc`` its trapezoid-rule area over ``f``. Returns ``{"auc": [B], "curve": [B, len(fractions)+1]}``.
    """
    _check_score(score, ("accuracy", "softmax", "sigmoid"))
    grid = torch.tensor((0.0, *fractions), dtype=torch.float64)
    if len(fractions) == 0 or not (grid.diff() > 0).all() or grid[-1] > 1:
        raise InputError(f"fractions must be increasing values in (0, 1], got {tuple(fractions)}")
    maps, targets, _ = _prepare(model, x, maps, targets)
    counts = torch.round(grid * maps[0].numel()).long().to(x.device)
    ranks = _ranks(maps, descending=False)
    curve = _rank_curve(model, ranks, counts, _baseline(x, baseline), x, targets, score, batch_size)
    return {"auc": torch.trapezoid(curve, grid.to(curve)), "curve": curve}


def map_density(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor,
                score: Literal["softmax", "sigmoid", "logit"] = "softmax", batch_size: int = 256) -> dict[str, Tensor]:
    """Positive ↑ and negative ↓ map density (Jalwana et al., CVPR 2021, CAMERAS; UCAG Table 5).

    With ``M`` the map min–max normalised to [0, 1] per sample (a constant map: all ones),
    ``D⁺ = f_t(x ⊙ M) / (Σ M / (H·W))`` and ``D⁻ = f_t(x ⊙ (1 − M)) / (Σ (1 − M) / (H·W))``, ``f_t`` the target's
    ``score``. A density whose map has zero mass (``D⁻`` of a constant map) is undefined: NaN.
    Returns ``{"positive": [B], "negative": [B]}``.
    """
    _check_score(score, ("softmax", "sigmoid", "logit"))
    maps, targets, _ = _prepare(model, x, maps, targets)
    kept = minmax_normalise(maps, constant=1.0)
    out = {}
    for name, m in (("positive", kept), ("negative", 1 - kept)):
        logits = _chunked_logits(model, lambda j, m=m: x[j] * m[j].unsqueeze(1), len(x), batch_size, x.device)
        mass = m.flatten(1).mean(1)
        value = _score(logits, targets, score) / mass.where(mass > 0, torch.ones_like(mass))
        out[name] = value.where(mass > 0, torch.full_like(mass, float("nan")))
    return out
