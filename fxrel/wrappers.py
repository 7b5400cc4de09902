"""Path and noise wrappers around any fxrel :class:`~fxrel.explainer.Explainer`: Integrated Gradients and SmoothGrad.

Both wrappers evaluate the explainer's map ``g(·)`` (its relevance at the input, shaped like the input) at many
modified copies of each image. The copies are rows of one batch, ``len(x) · steps`` (or ``· samples``) rows
in all, run in chunks of a fixed number of rows; the last chunk is padded (by repeating its last row), so every
chunk has the same shape and the explainer builds and reuses a single relevance program. The target of each
image is repeated for all its copies.

Row layout (step / sample major, like captum): row ``r`` holds image ``r mod N`` at step / sample ``r div N``.

*Integrated Gradients* (Sundararajan et al. 2017, Eq. 1 and its Riemann-sum approximation Eq. 3):

    IG_i(x) = (x_i − x₀_i) · ∫₀¹ g_i(x₀ + α (x − x₀)) dα  ≈  (x_i − x₀_i) · Σ_k w_k g_i(x₀ + α_k (x − x₀))

with the step positions ``α_k`` and weights ``w_k`` of captum's ``approximation_parameters`` (Riemann left /
right / middle / trapezoid, Gauss–Legendre). The integrand ``g`` is the explainer's map: with the ``gradient``
method, ``g = ∇_x f_t`` and this is exactly classic IG (captum's ``IntegratedGradients``). With any other method
``g`` is that method's relevance, averaged along the straight path and — unless ``multiply_by_inputs=False`` —
multiplied by ``x − x₀``. Methods whose maps already scale with the input (``gradient_x_input``, the LRP rule
sets) are usually wanted with ``multiply_by_inputs=False``: the path-averaged relevance map.

*SmoothGrad* (Smilkov et al. 2017, Eq. 1; SmoothGrad² with ``squared=True``):

    ŝ(x) = 1/n Σ_{j=1..n} g(x + ε_j),    ε_j ~ N(0, σ²),    σ = noise · (max x − min x)  (per image)

``squared=True`` averages ``g(x + ε_j)²`` instead. Each image's noise comes from its own keyed stream
(:mod:`fxrel.streams`, seeded with ``seed`` and the image's key; the global RNG is untouched): one
``torch.randn(image shape)`` draw per sample ``j`` in order, scaled by ``σ``; the result does not depend on the
chunk size, nor on the batch an image is in when it keeps its key.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from fxrel.catalog.registry import register_wrapper, signature_defaults
from fxrel.errors import InputError
from fxrel.explainer import Explainer, Target, cached_explainer
from fxrel.streams import Key, draw_rows, row_generators

INTEGRATION_RULES = ("riemann_trapezoid", "riemann_right", "riemann_left", "riemann_middle", "gausslegendre")
DEFAULT_MAX_BATCH = 64


# -- quadrature -----------------------------------------------------------------------------------------------------
def integration_parameters(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Step positions ``α_k ∈ [0, 1]`` and weights ``w_k`` of ``rule`` with ``steps`` points: the same values as
    captum's ``approximation_parameters(rule)`` (linspace in float32 for the Riemann rules,
    ``numpy.polynomial.legendre.leggauss`` rescaled to [0, 1] for Gauss–Legendre).

    Like captum's, the trapezoid rule puts ``steps`` equally spaced points on [0, 1] (both ends) with weights
    ``1/steps`` (halved at the ends), so its weights sum to ``1 − 1/steps`` rather than 1; the other rules' sum to 1.
    """
    if rule not in INTEGRATION_RULES:
        raise InputError(f"unknown integration rule '{rule}'; use one of {', '.join(INTEGRATION_RULES)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    n = steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if rule == "riemann_trapezoid":
        if n < 2:
            raise InputError("the trapezoid rule needs steps ≥ 2 (both end points)")
        alphas = torch.linspace(0, 1, n)
        weights = [1 / n] * n
        weights[0] /= 2
        weights[-1] /= 2
    else:
        weights = [1 / n] * n
        alphas = {"riemann_left": lambda: torch.linspace(0, 1 - 1 / n, n),
                  "riemann_right": lambda: torch.linspace(1 / n, 1, n),
                  "riemann_middle": lambda: torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)}[rule]()
    return alphas.tolist(), weights


# -- shared machinery -----------------------------------------------------------------------------------------------
def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _chunk_rows(total: int, chunk_size: int | None, max_batch: int) -> int:
    """Rows per chunk: ``chunk_size`` (at most ``total``), or the most even split of ``total`` into chunks of at
    most ``max_batch`` rows (least padding)."""
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size)
        return min(chunk_size, total)
    _check_count("max_batch", max_batch)
    chunks = math.ceil(total / max_batch)
    return math.ceil(total / chunks)


def padded_chunks(total: int, chunk: int, device: torch.device | str) -> Iterator[tuple[torch.Tensor, int]]:
    """Row indices ``0 … total−1`` in chunks of exactly ``chunk`` rows (the last one padded by repeating its last
    row, so every chunk has one shape and one relevance program), each with its number of real rows."""
    for start in range(0, total, chunk):
        rows = torch.arange(start, min(start + chunk, total), device=device)
        used = len(rows)
        yield (torch.cat([rows, rows[-1:].expand(chunk - used)]) if used < chunk else rows), used


def _relevance(explainer: Explainer, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    relevance = explainer.attribute(batch, targets).relevance
    if len(relevance) != 1:
        raise InputError(f"the wrappers need an explainer with one stop node at the input, got {sorted(relevance)}")
    (r,) = relevance.values()
    if r.shape != batch.shape:
        raise InputError(f"the explainer's relevance has shape {tuple(r.shape)}, not the input's "
                         f"{tuple(batch.shape)}; the wrappers need relevance at the input")
    return r


def _weighted_row_sum(explainer: Explainer, x: torch.Tensor, targets: torch.Tensor, copies: int,
                      make_rows: Callable[[torch.Tensor], torch.Tensor],
                      row_weight: Callable[[torch.Tensor], torch.Tensor],
                      chunk: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``out[i] = Σ_c weight(row) · transform(g(row))`` over the ``copies`` rows ``row = c·N + i`` of image ``i``,
    evaluated in equally shaped chunks of ``chunk`` rows (the last one padded by repeating its last row)."""
    n = len(x)
    out = torch.zeros_like(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    for rows, used in padded_chunks(n * copies, chunk, x.device):
        g = _relevance(explainer, make_rows(rows), targets[rows % n])[:used]
        rows = rows[:used]
        if transform is not None:
            g = transform(g)
        out.index_add_(0, rows % n, g * row_weight(rows).view(view))
    return out


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "infinite"
        raise InputError(f"{name} contains {bad} values")


# -- Integrated Gradients -------------------------------------------------------------------------------------------
def _baseline(x: torch.Tensor, baseline: torch.Tensor | float | None) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise InputError(f"baseline must be finite, got {baseline}")
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, torch.Tensor):
        raise InputError(f"baseline must be None, a number or a tensor, got {type(baseline).__name__}")
    if tuple(baseline.shape) not in (tuple(x.shape), tuple(x.shape[1:]), (1, *x.shape[1:])):
        raise InputError(f"baseline has shape {tuple(baseline.shape)}; expected {tuple(x.shape)} (one per image) or "
                         f"{tuple(x.shape[1:])} (shared)")
    _check_finite("baseline", baseline)
    return baseline.to(dtype=x.dtype, device=x.device).expand_as(x)


def integrated_gradients(explainer: Explainer, x: torch.Tensor, target: Target = None, *,
                         baseline: torch.Tensor | float | None = None, steps: int = 32,
                         rule: str = "riemann_trapezoid", chunk_size: int | None = None,
                         max_batch: int = DEFAULT_MAX_BATCH, multiply_by_inputs: bool = True) -> torch.Tensor:
    """Integrated Gradients of ``explainer`` on the batch ``x`` (Sundararajan et al. 2017, Eq. 1/3):

        IG(x) = (x − x₀) ⊙ Σ_k w_k g(x₀ + α_k (x − x₀)),

    ``g`` being the explainer's map (the gradient for method ``"gradient"``: classic IG, equal to captum's
    ``IntegratedGradients`` with the same ``steps``, ``rule`` = captum's ``method`` and baseline).

    ``baseline``: ``None`` (zeros), a number, or a tensor shaped like ``x`` or like one image. ``rule``: one of
    :data:`INTEGRATION_RULES` (step positions and weights as in captum). ``target``: as for the explainer; ``None``
    or ``"top-k"`` is resolved once on ``x``, not per step. The ``len(x) · steps`` path points run as a batch, in
    equally shaped chunks of ``chunk_size`` rows (default: the most even split into chunks of ≤ ``max_batch`` rows),
    so one relevance program serves all chunks. ``multiply_by_inputs=False`` returns the path-averaged map
    ``Σ_k w_k g(·)`` without the ``(x − x₀)`` factor. Returns a tensor shaped like ``x``.
    """
    explainer.check_call(x)
    alphas, weights = integration_parameters(rule, steps)
    x0 = _baseline(x, baseline)
    targets = explainer.resolve_targets(x, target)
    n = len(x)
    alpha_t = torch.tensor(alphas, dtype=x.dtype, device=x.device)
    weight_t = torch.tensor(weights, dtype=x.dtype, device=x.device)
    delta = x - x0
    view = (-1,) + (1,) * (x.dim() - 1)

    def make_rows(rows: torch.Tensor) -> torch.Tensor:
        i = rows % n
        return x0[i] + alpha_t[rows // n].view(view) * delta[i]

    total = _weighted_row_sum(explainer, x, targets, steps, make_rows, lambda rows: weight_t[rows // n],
                              _chunk_rows(n * steps, chunk_size, max_batch))
    return total * delta if multiply_by_inputs else total


# -- SmoothGrad -----------------------------------------------------------------------------------------------------
class _NoiseStream:
    """Noise of sample ``j``: for each image ``i`` the ``j``-th ``torch.randn(image shape)`` draw of its own keyed
    stream (:mod:`fxrel.streams`), drawn in order on demand and dropped once no later chunk can need it."""

    def __init__(self, like: torch.Tensor, seed: int, keys: Sequence[Key] | torch.Tensor | None) -> None:
        self.like = like
        self.generators = row_generators(seed, "smoothgrad", keys, len(like))
        self.drawn: dict[int, torch.Tensor] = {}
        self.next = 0

    def get(self, samples: torch.Tensor) -> torch.Tensor:
        """Noise for the given sample indices, one image-batch shaped tensor per index, stacked."""
        lo, hi = int(samples.min()), int(samples.max())
        while self.next <= hi:
            self.drawn[self.next] = draw_rows(self.generators, self.like.shape[1:], normal=True,
                                              dtype=self.like.dtype, device=self.like.device)
            self.next += 1
        for j in [j for j in self.drawn if j < lo]:  # rows arrive in increasing order
            del self.drawn[j]
        return torch.stack([self.drawn[j] for j in range(lo, hi + 1)])  # [hi − lo + 1, N, …]


def smoothgrad(explainer: Explainer, x: torch.Tensor, target: Target = None, *, samples: int = 16,
               noise: float = 0.15, squared: bool = False, seed: int = 0, chunk_size: int | None = None,
               max_batch: int = DEFAULT_MAX_BATCH, keys: Sequence[Key] | torch.Tensor | None = None) -> torch.Tensor:
    """SmoothGrad of ``explainer`` on the batch ``x`` (Smilkov et al. 2017, Eq. 1):

        ŝ(x) = 1/n Σ_j g(x + ε_j),   ε_j ~ N(0, σ²),   σ = noise · (max x − min x) per image,

    or the mean of ``g(x + ε_j)²`` with ``squared=True`` (SmoothGrad²). ``g`` is the explainer's map. Noise of image
    ``i``: the ``j``-th ``torch.randn(x.shape[1:])`` draw (``j = 0 … samples−1``, in ``x``'s dtype, on the CPU, then
    moved to ``x``'s device) of its own stream keyed ``(seed, keys[i])`` (:mod:`fxrel.streams`; ``keys``, one per
    image, default: the positions ``0 … N−1``), times ``σ``. The global RNG is untouched, and an image's map depends
    on neither the chunking nor, when it keeps its key, the batch it is in or the device. ``target``: as for the
    explainer (``None``/``"top-k"`` resolved once on ``x``). The ``len(x) · samples`` noisy copies run as a batch in
    equally shaped chunks (see :func:`integrated_gradients`).
    Returns a tensor shaped like ``x``.
    """
    explainer.check_call(x)
    _check_count("samples", samples)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise InputError(f"noise must be a finite number ≥ 0 (std as a fraction of the image's range), got {noise!r}")
    targets = explainer.resolve_targets(x, target)
    n = len(x)
    flat = x.flatten(1)
    sigma = (noise * (flat.max(1).values - flat.min(1).values)).view((-1,) + (1,) * (x.dim() - 1))
    stream = _NoiseStream(x, seed, keys)

    def make_rows(rows: torch.Tensor) -> torch.Tensor:
        j, i = rows // n, rows % n
        eps = stream.get(j)[j - j.min(), i]
        return x[i] + sigma[i] * eps

    weight = torch.tensor(1.0 / samples, dtype=x.dtype, device=x.device)
    return _weighted_row_sum(explainer, x, targets, samples, make_rows, lambda rows: weight.expand(len(rows)),
                             _chunk_rows(n * samples, chunk_size, max_batch),
                             transform=torch.square if squared else None)


def over_base(wrapper: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``wrapper(explainer, x, target, **params)`` as a registered method: ``base`` names the wrapped method (its
    parameters in ``base_params``), whose explainer is cached per model."""
    def run(model: torch.nn.Module, x: torch.Tensor, target: Target = None, base: str = "gradient",
            base_params: dict | None = None, **params) -> torch.Tensor:
        return wrapper(cached_explainer(model, base, **(base_params or {})), x, target, **params)
    return run


_BASE = {"base": "gradient", "base_params": None}
register_wrapper("integrated_gradients", over_base(integrated_gradients),
                 "Integrated Gradients of any method (base=NAME): path points batched and chunked",
                 "Sundararajan et al. 2017", "signed, shaped like the input; Σ ≈ f(x) − f(x₀) for base='gradient'",
                 {**_BASE, **signature_defaults(integrated_gradients, skip=3)})
register_wrapper("smoothgrad", over_base(smoothgrad), "SmoothGrad of any method (base=NAME): noisy copies batched",
                 "Smilkov et al. 2017", "as the base method (squared=True: non-negative)",
                 {**_BASE, **signature_defaults(smoothgrad, skip=3)})
