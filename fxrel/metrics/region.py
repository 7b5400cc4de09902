"""Region faithfulness metrics of the transformer-LRP literature: region perturbation (MoRF / LeRF curves and the
area between them, ABPC) and ROAD (removal by noisy linear imputation).

Shares the model-side helpers of :mod:`fxrel.metrics.perturbation` (checks, chunked no-grad forward passes, scores,
baselines, rankings). Random draws (ROAD's imputation noise) come from keyed streams (:mod:`fxrel.streams`): a row's
noise depends on ``(seed, name, key)`` only, not on the batch it is in, its position or ``batch_size``.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxrel.errors import InputError, NumericalError
from fxrel.metrics.perturbation import _baseline, _check_score, _chunked_logits, _prepare, _rank_curve, _ranks, _score
from fxrel.streams import Key, draw_rows, row_generators


def _check_baseline(baseline: object) -> None:
    if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float, Tensor)):
        raise InputError(f'baseline must be "zero", "blur", a number or a tensor, got {type(baseline).__name__}')


def _patch_ranks(maps: Tensor, patch: int, descending: bool) -> Tensor:
    """``[B, H, W]``: every pixel's position in the (stable) ordering of the patches by their map sums."""
    batch, height, width = maps.shape
    sums = maps.reshape(batch, height // patch, patch, width // patch, patch).sum((2, 4))
    ranks = _ranks(sums, descending)
    return ranks.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def region_perturbation(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor, patch: int = 8,
                        patches_per_step: int = 1, baseline: float | str | Tensor = "zero",
                        score: Literal["logit", "softmax", "sigmoid"] = "logit", batch_size: int = 256,
                        blur_sigma: float = 5.0, blur_size: int = 11) -> dict[str, Tensor]:
    """Region perturbation (Samek et al., IEEE TNNLS 2017, "Evaluating the visualization of what a deep neural
    network has learned") in MoRF and LeRF order, and ABPC (area between the perturbation curves, as AttnLRP,
    Achtibat et al., ICML 2024, reports it). ABPC higher ↑ (MoRF AUC lower ↓, LeRF AUC higher ↑).

    The image is cut into ``P = (H/patch)·(W/patch)`` square patches, each scored by its map sum ``Σ_{p∈patch} M_p``
    and ordered most relevant first (MoRF) or least relevant first (LeRF; ties in patch order, both orders). After
    ``n_s = min(s·k, P)`` patches (``k = patches_per_step``, ``s = 0 … ⌈P/k⌉``) every channel of the removed patches
    is replaced by the baseline and the curve is the target's ``score`` ``f_t(x^{(s)})``; ``f_t(x^{(0)}) = f_t(x)``.
    ``AUC = ∫₀¹ f_t dφ`` by the trapezoid rule over the removed fraction ``φ_s = n_s/P``, and
    ``ABPC = AUC_LeRF − AUC_MoRF``. Samek et al. remove one region per step (``k = 1``) and average the drops
    ``f_t(x) − f_t(x^{(s)})`` (AOPC); with the scores the MoRF − LeRF difference of those areas is ABPC.

    ``baseline``: ``"zero"`` (default: on mean/std-normalised inputs the dataset's mean colour, deterministic, and
    quantus's numeric baseline 0), ``"blur"`` (Gaussian, ``blur_sigma``, ``blur_size``), a number or a tensor that
    broadcasts to ``x``. (Samek et al. draw uniform noise; a fixed baseline keeps the metric free of random
    draws.) ``score``: ``"logit"`` (default, the pre-softmax output Samek et al. track; softmax saturates and
    compresses the curves), ``"softmax"`` or ``"sigmoid"``. Costs ``2·(⌈P/k⌉ + 1)`` forward passes per image.

    Agrees with quantus 0.6.0's ``RegionPerturbation(patch_size=patch, order="morf"|"lerf", normalise=False,
    perturb_baseline=0.0)``, whose curve is the drop ``f_t(x) − f_t(x^{(s)})`` for ``s = 1 … P`` (``k = 1``), to the
    bit (measured difference 0.0 for logits and softmax, float32; tests/test_metrics_region.py).
    Returns ``{"morf", "lerf", "abpc": [B], "morf_curve", "lerf_curve": [B, ⌈P/k⌉ + 1]}``.
    """
    _check_score(score, ("logit", "softmax", "sigmoid"))
    _check_baseline(baseline)
    maps, targets, _ = _prepare(model, x, maps, targets)
    height, width = maps.shape[1:]
    if isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= min(height, width) \
            or height % patch or width % patch:
        raise InputError(f"patch must be a positive integer that divides the image size {height}×{width} "
                         f"(at most {min(height, width)}), got {patch!r}")
    patches = (height // patch) * (width // patch)
    if isinstance(patches_per_step, bool) or not isinstance(patches_per_step, int) \
            or not 1 <= patches_per_step <= patches:
        raise InputError(f"patches_per_step must be an integer in [1, {patches}] (the number of {patch}×{patch} "
                         f"patches), got {patches_per_step!r}")
    base = _baseline(x, baseline, blur_sigma, blur_size)
    steps = math.ceil(patches / patches_per_step)
    counts = (torch.arange(steps + 1, device=x.device) * patches_per_step).clamp(max=patches)
    fractions = counts.to(maps.dtype) / patches
    out = {}
    for order, descending in (("morf", True), ("lerf", False)):
        ranks = _patch_ranks(maps, patch, descending)
        curve = _rank_curve(model, ranks, counts, base, x, targets, score, batch_size)
        out[order], out[f"{order}_curve"] = torch.trapezoid(curve, fractions.to(curve)), curve
    out["abpc"] = out["lerf"] - out["morf"]
    return {k: out[k] for k in ("morf", "lerf", "abpc", "morf_curve", "lerf_curve")}


def _neighbour_sum(v: Tensor) -> Tensor:
    """``Σ_j w_j v_j`` over the 8 neighbours ``j`` of every pixel of ``[N, C, H, W]`` (zero outside the image):
    ``(Σ direct)/6 + (Σ diagonal)/12`` by shifted slices (faster than a depthwise 3×3 conv in float64)."""
    height, width = v.shape[-2:]
    p = F.pad(v, (1, 1, 1, 1))
    direct = p[..., :height, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :width] + p[..., 1:-1, 2:]
    diagonal = p[..., :height, :width] + p[..., :height, 2:] + p[..., 2:, :width] + p[..., 2:, 2:]
    return direct / 6 + diagonal / 12


def _linear_imputation(x: Tensor, removed: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """ROAD's noise-free linear imputation of the ``removed`` pixels of ``x`` (``[N, C, H, W]``, ``[N, H, W]``),
    by Jacobi-preconditioned conjugate gradients in float64, one system per image and channel, all at once.

    For every removed pixel ``i``: ``s_i·u_i − Σ_{j removed} w_ij u_j = Σ_{j known} w_ij x_j`` with ``s_i`` the sum
    of its in-image neighbours' weights, i.e. ``u_i`` is the weighted mean of its in-image neighbours. The matrix
    (the 8-neighbour graph Laplacian restricted to the removed set) is symmetric positive definite as long as the
    image keeps a known pixel. A system is done when every removed pixel's deviation from its neighbours' weighted
    mean, ``|r_i|/s_i``, is at most ``tol · max|x_known|`` on the TRUE residual ``r = b − A·u`` (CG is re-started
    from it if the recurrence drifted); done systems leave the iteration. More than ``max_iter`` iterations
    (default ``10·(H + W) + 100``) raise :class:`NumericalError`.
    """
    n, channels, height, width = x.shape
    dtype = torch.float32 if x.device.type == "mps" else torch.float64      # MPS has no float64
    xd = x.to(dtype).reshape(n * channels, 1, height, width)
    m = removed.to(dtype).repeat_interleave(channels, 0).unsqueeze(1)
    diag = _neighbour_sum(torch.ones(1, 1, height, width, dtype=dtype, device=x.device))
    inverse = 1 / diag
    known = xd * (1 - m)
    b = m * _neighbour_sum(known)
    bound = tol * known.abs().amax((1, 2, 3))                            # the allowed deviation of each system
    del known
    limit = 10 * (height + width) + 100 if max_iter is None else max_iter

    def apply(v: Tensor, mask: Tensor) -> Tensor:
        return mask * (diag * v - _neighbour_sum(v))

    def deviation(z: Tensor) -> Tensor:
        return z.abs().amax((1, 2, 3))

    def dot(a: Tensor, c: Tensor) -> Tensor:
        return (a * c).sum((1, 2, 3), keepdim=True)

    u = b * inverse
    todo = torch.arange(len(u), device=x.device)
    iterations = 0
    while True:
        r = b[todo] - apply(u[todo], m[todo])                            # the true residual
        left = deviation(r * inverse) > bound[todo]
        todo, r = todo[left], r[left]
        if len(todo) == 0:
            return torch.where(m > 0, u, xd).view_as(x).to(x.dtype)
        if iterations >= limit:
            break
        mask, v, z = m[todo], u[todo], r * inverse
        p, rz, index = z, dot(r, z), todo
        while iterations < limit and len(index):
            iterations += 1
            ap = apply(p, mask)
            alpha = rz / dot(p, ap).clamp(min=torch.finfo(dtype).tiny)
            v, r = v + alpha * p, r - alpha * ap
            z = r * inverse
            rz_next = dot(r, z)
            done = deviation(z) <= bound[index]
            if done.any():                                               # done systems leave the iteration
                u[index[done]] = v[done]
                keep = ~done
                index, mask, v, r, z, p, rz, rz_next = (t[keep] for t in (index, mask, v, r, z, p, rz, rz_next))
            p = z + rz_next / rz.clamp(min=torch.finfo(dtype).tiny) * p
            rz = rz_next
        u[index] = v
    worst = (deviation(r * inverse) / bound[todo].clamp(min=torch.finfo(dtype).tiny)).max().item()
    raise NumericalError(f"the linear imputation did not converge in {limit} conjugate-gradient iterations "
                         f"({len(todo)} of {len(u)} image channels left, worst deviation {worst:.3g}× the "
                         f"tolerance tol={tol}); raise max_iter or tol")


def _check_imputation(x: Tensor, removed: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """The checked ``removed`` mask (bool, on ``x``'s device) of :func:`noisy_linear_imputation`."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"x must be a floating [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(removed, Tensor) or tuple(removed.shape) != (x.shape[0], *x.shape[2:]):
        raise InputError(f"removed must be a bool [B, H, W] = {[x.shape[0], *x.shape[2:]]} mask, got "
                         f"{getattr(removed, 'shape', type(removed).__name__)}")
    removed = removed.to(device=x.device, dtype=torch.bool)
    full = removed.flatten(1).all(1)
    if full.any():
        raise InputError(f"every pixel is removed in samples {full.nonzero().flatten().tolist()}; the imputation "
                         "needs at least one known pixel")
    if not torch.isfinite(x).all():
        raise InputError("x contains NaN or inf values")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise InputError(f"max_iter must be None or a positive integer, got {max_iter!r}")
    return removed


def _check_noise(noise: float) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise InputError(f"noise must be a finite number >= 0 (the std of the imputation noise), got {noise!r}")


def noisy_linear_imputation(x: Tensor, removed: Tensor, noise: float = 0.01, seed: int = 0,
                            keys: Sequence[Key] | Tensor | None = None, tol: float = 1e-9,
                            max_iter: int | None = None) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al., ICML 2022; official code and quantus's
    ``noisy_linear_imputation``): ``x`` ``[B, C, H, W]`` with its ``removed`` pixels (bool ``[B, H, W]``, every
    channel) replaced by the solution of

    ``u_i = Σ_{j∈N(i)} w_ij v_j / Σ_{j∈N(i)} w_ij``   (``N(i)``: the in-image 8-neighbours, ``w = 1/6`` direct,
    ``1/12`` diagonal; ``v_j = u_j`` if ``j`` is removed, else ``x_j``, which stay fixed)

    one sparse system per image and channel, solved by Jacobi-preconditioned conjugate gradients in float64 until
    every removed pixel deviates from its neighbours' weighted mean by at most ``tol · max|x_known|`` (checked on
    the true residual; :class:`NumericalError` after ``max_iter`` iterations, default ``10·(H+W) + 100``), then
    ``noise · N(0, 1)`` added to the imputed pixels. The noise of row ``b`` comes from the keyed stream
    ``(seed, "noisy_linear_imputation", keys[b])`` (:mod:`fxrel.streams`; ``keys=None``: the row positions).

    With ``noise=0`` it equals quantus 0.6.0's ``noisy_linear_imputation`` (a direct ``scipy`` ``spsolve``) to
    1e-8 of ``max|x|`` at the default ``tol`` (measured at most 9.2e-9 on float64 16–32 px images, 5–99 % removed;
    tests/test_metrics_region.py checks 2e-8); the result has ``x``'s dtype. Memory: about ten float64 copies of
    ``x``.
    """
    removed = _check_imputation(x, removed, tol, max_iter)
    _check_noise(noise)
    out = _linear_imputation(x, removed, tol, max_iter)
    if noise > 0:
        generators = row_generators(seed, "noisy_linear_imputation", keys, len(x))
        draws = draw_rows(generators, x.shape[1:], normal=True, dtype=x.dtype, device=x.device)
        out = out + noise * draws * removed.unsqueeze(1)
    return out


def _check_percentages(percentages: Sequence[float]) -> list[float]:
    try:
        values = [float(p) for p in percentages]
    except (TypeError, ValueError):
        raise InputError(f"percentages must be a sequence of numbers in (0, 100), got {percentages!r}") from None
    if not values or any(not 0 < p < 100 for p in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError(f"percentages must be strictly increasing numbers in (0, 100), got {tuple(percentages)}")
    return values


def road(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor,
         percentages: Sequence[float] = tuple(range(1, 100, 2)), noise: float = 0.01,
         score: Literal["accuracy", "softmax", "sigmoid", "logit"] = "accuracy", seed: int = 0,
         keys: Sequence[Key] | Tensor | None = None, batch_size: int = 256, tol: float = 1e-9,
         max_iter: int | None = None) -> dict[str, Tensor]:
    """ROAD, RemOve And Debias (Rong et al., ICML 2022, "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods"), MoRF and LeRF. MoRF AUC lower ↓, LeRF AUC higher ↑, their difference higher ↑.

    For each percentage ``p`` the ``n_p = ⌊H·W·p/100⌋`` most (MoRF) or least (LeRF) relevant pixels (stable order,
    every channel) are removed from the ORIGINAL image by :func:`noisy_linear_imputation` (each removed pixel the
    weighted mean of its 8 neighbours, ``+ noise·N(0, 1)``) and the curve is the target's ``score``:
    ``"accuracy"`` (default, as the paper and quantus: 1 while the target is the arg-max class; a dataset's mean
    is the paper's accuracy curve), ``"softmax"``, ``"sigmoid"`` or ``"logit"`` (continuous per-sample curves).
    ``AUC = Σ trapezoids of the curve over p/100`` (over the given percentages only, no 0 % point),
    ``difference = AUC_LeRF − AUC_MoRF``. Defaults: ``percentages = 1, 3, … 99`` and ``noise = 0.01`` (quantus's
    ``ROAD``; the paper's curves also step in a few percent).

    The noise of row ``b`` comes from the keyed stream ``(seed, "road", keys[b])`` (:mod:`fxrel.streams`; the
    evaluation passes ``(image index, class)`` keys, ``None`` the row positions): one ``[C, H, W]`` normal draw
    per order (MoRF, then LeRF) and percentage, in that order, so a row's result does not depend on its batch,
    position or ``batch_size``. ``tol`` / ``max_iter``: the conjugate-gradient solve's stopping rule (see
    :func:`noisy_linear_imputation`; unconverged solves raise :class:`NumericalError`).

    Agrees exactly with quantus 0.6.0's ``ROAD(normalise=False)`` accuracy curves (MoRF; LeRF through the negated
    map) on one-channel images at ``noise=0`` (quantus ranks the map broadcast to ``C·H·W`` features but imputes
    ``H·W`` pixels, so it raises an IndexError for ``C > 1``); the ``"logit"`` curves equal the model on quantus's
    ``noisy_linear_imputation`` to 5e-7 relative (float32; tests/test_metrics_region.py). Each chunk of
    ``batch_size`` imputations holds about ten float64 copies of it (≈ 3 GB for 256 images of 3×224²).
    Returns ``{"morf", "lerf", "difference": [B], "morf_curve", "lerf_curve": [B, len(percentages)]}``.
    """
    _check_score(score, ("accuracy", "softmax", "sigmoid", "logit"))
    _check_noise(noise)
    values = _check_percentages(percentages)
    maps, targets, _ = _prepare(model, x, maps, targets)
    _check_imputation(x, torch.zeros_like(maps, dtype=torch.bool), tol, max_iter)
    batch, pixels = len(x), maps[0].numel()
    counts = torch.tensor([int(pixels * p / 100) for p in values], device=x.device)
    fractions = torch.tensor(values, dtype=torch.float64) / 100
    generators = row_generators(seed, "road", keys, batch)
    out = {}
    for order, descending in (("morf", True), ("lerf", False)):
        ranks = _ranks(maps, descending)

        def make(j: Tensor, ranks: Tensor = ranks) -> Tensor:
            k, b = j // batch, j % batch
            removed = ranks[b] < counts[k].view(-1, 1, 1)
            imputed = _linear_imputation(x[b], removed, tol, max_iter)
            if noise > 0:       # row b's draws in the order of j: percentages ascending, whatever the chunking
                draws = draw_rows([generators[i] for i in b.tolist()], x.shape[1:], normal=True, dtype=x.dtype,
                                  device=x.device)
                imputed = imputed + noise * draws * removed.unsqueeze(1)
            return imputed

        logits = _chunked_logits(model, make, len(values) * batch, batch_size, x.device)
        curve = _score(logits, targets.repeat(len(values)), score).view(-1, batch).T
        out[order], out[f"{order}_curve"] = torch.trapezoid(curve, fractions.to(curve)), curve
    out["difference"] = out["lerf"] - out["morf"]
    return {k: out[k] for k in ("morf", "lerf", "difference", "morf_curve", "lerf_curve")}
