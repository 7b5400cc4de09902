"""UCAG — Unfold and Conquer Attribution Guidance (Hong, Nam, Jeon, Lee, AAAI 2023), a wrapper over any method.

The image ``I`` (``H×W``) is unfolded into ``n²`` overlapping crops of ``h_c×w_c = ⌊ρH⌋×⌊ρW⌋`` pixels (Eq. 1–2),
each up-scaled (bicubic) to the input's own ``H×W`` (``alpha="input"``, the default) or, with a number, by ``α`` to
``⌊α h_c⌋×⌊α w_c⌋`` (the paper's ``α = 2.6`` makes crops 1.44× the input).

The defaults ``ρ = 0.75``, ``alpha="input"`` (each crop zoomed 1.33×) hold on networks trained without scale
augmentation and on fixed-size classifiers (a flatten → linear head takes nothing else; ``α = 1/ρ`` would floor to
95 px at 96 px). The paper's ``ρ = 0.555, α = 2.6`` (zoom 2.6×, crops 1.44× the input) is out of distribution for
the first and impossible for the second. Zoom is the mechanism: on the zoo's BasicBlock ResNet (16 scenes, 36 pairs,
Grad-CAM base, crops at the input size) ρ = 0.555 / 0.65 / 0.75 / 0.9 (zoom 1.8 / 1.54 / 1.33 / 1.11×) give pointing
game 0.92 / 1.00 / 1.00 / 1.00, energy pointing game 0.57 / 0.51 / 0.44 / 0.38 and discrimination 0.85 / 0.90 / 0.92
/ 0.92, against Grad-CAM's 1.00, 0.35, 0.90.

Every crop ``P_j`` is explained for the *full image's* class ``k`` (Eq. 3), ``M_j = E(P_j, k)``; all crops of a batch
are explained as one batch, in equally shaped chunks of ``chunk_size`` crops (the last one padded), so the base
method builds a single relevance program. Each partial map is weighted by the model's confidence on its crop
(Eq. 4)::

    Y_j = exp(p_j),   p_j = softmax(f(P_j))_k                        (weighting="exp_softmax", the paper)

resized back to the crop (bilinear) and folded onto the canvas, each pixel of a crop weighted by a blending window
``g`` (``blend``), and the sum divided by the windows' coverage (Eq. 5–6 with ``g = 1``: the duplication count
``Γ``)::

    UCAG(I) = (Σ_j  Y_j · pad_j(g ⊙ resize(M_j)))  ⊘  G,    G = Σ_j pad_j(g)

``blend="gaussian"`` (the default) is the Gaussian importance window of sliding-window inference (MONAI's
``compute_importance_map``, ``sigma_scale=0.125``): ``g(u, v) = exp(−(u² + v²)/(2σ²))`` in pixels from the crop's
centre, ``σ = blend_sigma`` × the crop side, floored at 10⁻³. ``blend="uniform"`` is the paper's ``g = 1``.

Why a window: a partial map is least reliable at its crop's border, where the crop cuts objects and the network
pads zeros inside the image. Measured on the zoo (40 scenes, LRP-ε+♭ partial maps, sigmoid weights): the target's
share of the positive relevance on the objects falls from 0.962 / 0.941 (zoo-bottleneck / zoo-vgg) 12–24 px from
the 48-px crop's edge to 0.809 / 0.783 in its outer 3 px, where the base map on the same pixels keeps 0.98 / 0.96.
The uniform fold gives those border pixels the weight of the centre; with it UCAG's discrimination fell below its
own base's on every zoo CNN (LRP-ε+♭ base: by 0.02–0.04; its energy pointing game below on four of six). With the
Gaussian window every pixel is explained mostly by the crops it is central to: on the zoo's six CNNs (40 scenes,
``docs/fidelity.md``) UCAG's pointing game and energy pointing game are ≥ its base's for both bases on all six, and
9 of the 12 (model, base) pairs meet the fidelity bar (2 with the uniform window).

The divisor is ``G`` by default (``average="coverage"``, the paper); ``average="coverage_plus_one"`` divides by
``G + 1``, which with ``blend="uniform"`` is the official code's ``Γ + 1`` (its count starts at one). Under the
uniform window, where a pixel is covered by few crops its average is noisy and Grad-CAM-based maxima fell on the
border (14 of 174 maxima where ``Γ ≤ 4``), and ``Γ + 1`` shrank those pixels. The Gaussian window handles the
crops' borders at their cause; adding one to its coverage darkens the image's border, which raises the energy
pointing game but costs discrimination (zoo, Grad-CAM base: 0.009–0.023 lower than with ``G``).

Further options reproducing the official code (``KU-HJH/UCAG``): ``weighting="exp_softmax_max"`` divides the
weights by their maximum over the crops (``--score``), ``weighting="none"`` is the code's default of no weighting;
``center=True`` subtracts each partial map's mean (its LRP wrappers). It raises the positive-part metrics,
but not by UCAG's doing: on zoo-bottleneck / zoo-densenet (12 scenes, LRP-ε+♭ base) it takes UCAG's energy
pointing game 0.848 → 0.906 / 0.650 → 0.720 and discrimination 0.926 → 0.949 / 0.894 → 0.915, and centering the
base's own map gives 0.897 / 0.718 and 0.959 / 0.924: the shift removes weak positive relevance from any map.

Post-processing follows the family of the base method: CAM maps are computed without their final ReLU
(``wonorm``), and the aggregate is ReLU-ed, min–max normalised per image and blurred (Gaussian 5×5, σ = 3);
propagation methods return the raw signed aggregate.

On transformers UCAG wraps any base that runs there (``grad_cam`` reads the token grid, ``attn_lrp``, LRP rule sets);
its default crops at the input size are what a ViT with a fixed patch grid and position embedding accepts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fxrel.catalog.cam import CAM_METHODS
from fxrel.catalog.registry import REGISTRY, register_wrapper, signature_defaults
from fxrel.errors import InputError
from fxrel.explainer import explain, resolve_targets
from fxrel.imageops import gaussian_blur, minmax_normalise, resize_maps
from fxrel.wrappers import padded_chunks

__all__ = ["UnfoldGeometry", "unfold_geometry", "blend_window", "unfold", "fold", "confidence_weights", "ucag",
           "CAM_METHODS"]

PartialExplainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Weighting = Literal["exp_softmax", "exp_softmax_max", "softmax", "sigmoid", "none"]
Average = Literal["coverage", "coverage_plus_one"]
Blend = Literal["gaussian", "uniform"]
WEIGHTINGS = ("exp_softmax", "exp_softmax_max", "softmax", "sigmoid", "none")
AVERAGES = ("coverage", "coverage_plus_one")
BLENDS = ("gaussian", "uniform")
WINDOW_FLOOR = 1e-3  #: the smallest window weight (MONAI's floor): no pixel of a crop is dropped


@dataclass(frozen=True)
class UnfoldGeometry:
    """Where the ``n²`` crops lie (row-major, crop ``j = a·n + b``) and the size they are explained at."""

    height: int
    width: int
    crop: tuple[int, int]              #: (h_c, w_c)
    scaled: tuple[int, int]            #: (⌊α h_c⌋, ⌊α w_c⌋), the size each crop is explained at
    rows: tuple[int, ...]              #: top offsets, one per crop row
    cols: tuple[int, ...]              #: left offsets, one per crop column

    @property
    def windows(self) -> list[tuple[int, int]]:
        """Top-left corners of the crops in row-major order."""
        return [(r, c) for r in self.rows for c in self.cols]

    def coverage(self, window: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """``G = Σ_j pad_j(g)``, ``[H, W]``: the blending ``window`` ``g`` (``[h_c, w_c]``) summed over the crops;
        without one, ``Γ``: how many crops cover each pixel."""
        h, w = self.crop
        if window is None:
            window = torch.ones(h, w, device=device)
        count = window.new_zeros(self.height, self.width)
        for r, c in self.windows:
            count[r:r + h, c:c + w] += window
        return count


def unfold_geometry(height: int, width: int, n: int = 6, rho: float = 0.75,
                    alpha: float | Literal["input"] = "input") -> UnfoldGeometry:
    """The crop layout for an ``height×width`` image: ``n`` crops per side of ``⌊ρ·side⌋`` pixels, scaled by ``α``
    (a number), or to exactly ``height×width`` (``alpha="input"``, the default: see :func:`ucag`)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n (crops per side) must be a positive integer, got {n!r}")
    if not 0 < rho <= 1:
        raise InputError(f"rho (crop side / image side) must lie in (0, 1], got {rho!r}")
    if alpha != "input" and (isinstance(alpha, (str, bool)) or not alpha > 0):
        raise InputError(f"alpha (crop up-scaling) must be a positive number or 'input', got {alpha!r}")
    crop = (int(rho * height), int(rho * width))
    if min(crop) < 1:
        raise InputError(f"rho={rho} gives empty crops on a {height}×{width} image")
    scaled = (height, width) if alpha == "input" else (int(crop[0] * alpha), int(crop[1] * alpha))
    if min(scaled) < 1:
        raise InputError(f"alpha={alpha} scales the {crop[0]}×{crop[1]} crops to nothing")

    def offsets(side: int, size: int) -> tuple[int, ...]:
        return tuple(torch.linspace(0, side - size, n).round().long().tolist()) if n > 1 else ((side - size) // 2,)

    return UnfoldGeometry(height, width, crop, scaled, offsets(height, crop[0]), offsets(width, crop[1]))


def blend_window(crop: tuple[int, int], blend: Blend = "gaussian", sigma: float = 0.125,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight ``g`` of each pixel of a crop in the fold, ``[h_c, w_c]``: ``"uniform"``: 1 (the paper);
    ``"gaussian"``: ``exp(−(u² + v²)/(2σ²))`` at ``u = i − (h_c − 1)/2``, ``v = j − (w_c − 1)/2`` with
    ``σ = sigma·side`` per axis, floored at :data:`WINDOW_FLOOR` (MONAI's importance map)."""
    if blend not in BLENDS:
        raise InputError(f"blend must be one of {list(BLENDS)}, got {blend!r}")
    if blend == "uniform":
        return torch.ones(crop, device=device, dtype=dtype)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise InputError(f"blend_sigma (the Gaussian window's σ / crop side) must be a positive number, got {sigma!r}")
    axes = [torch.exp(-0.5 * ((torch.arange(side, device=device, dtype=torch.float64) - (side - 1) / 2)
                              / (sigma * side)) ** 2) for side in crop]
    return (axes[0][:, None] * axes[1][None]).clamp(min=WINDOW_FLOOR).to(dtype or torch.get_default_dtype())


def unfold(x: torch.Tensor, geometry: UnfoldGeometry) -> torch.Tensor:
    """The crops of every image, up-scaled (bicubic, ``align_corners=False``): ``[N·n², C, ⌊αh_c⌋, ⌊αw_c⌋]``,
    image-major (rows ``i·n² … i·n² + n² − 1`` belong to image ``i``)."""
    h, w = geometry.crop
    crops = torch.stack([x[:, :, r:r + h, c:c + w] for r, c in geometry.windows], dim=1).flatten(0, 1)
    return F.interpolate(crops, size=geometry.scaled, mode="bicubic", align_corners=False)


def fold(maps: torch.Tensor, weights: torch.Tensor, geometry: UnfoldGeometry, average: Average = "coverage",
         blend: Blend = "gaussian", blend_sigma: float = 0.125) -> torch.Tensor:
    """Eq. 5–6 with a blending window: resize each partial map ``[N·n², h, w]`` to its crop (bilinear), weight it
    by its crop's ``Y_j`` and by the window ``g`` (:func:`blend_window`), add it at its place and divide by the
    windows' coverage ``G`` (``"coverage"``) or ``G + 1`` (``"coverage_plus_one"``; uniform: the official ``Γ + 1``)."""
    if average not in AVERAGES:
        raise InputError(f"average must be one of {list(AVERAGES)}, got {average!r}")
    window = blend_window(geometry.crop, blend, blend_sigma, maps.device, maps.dtype)
    count = len(geometry.windows)
    resized = resize_maps(maps, geometry.crop) * weights.reshape(-1, 1, 1) * window
    resized = resized.view(-1, count, *geometry.crop)
    canvas = maps.new_zeros(resized.shape[0], geometry.height, geometry.width)
    h, w = geometry.crop
    for j, (r, c) in enumerate(geometry.windows):
        canvas[:, r:r + h, c:c + w] += resized[:, j]
    divisor = geometry.coverage(window)
    return canvas / (divisor + 1 if average == "coverage_plus_one" else divisor)


def confidence_weights(logits: torch.Tensor, targets: torch.Tensor, crops_per_image: int,
                       weighting: Weighting = "exp_softmax") -> torch.Tensor:
    """Eq. 4: the weight ``Y_j`` of every crop from its logits ``[N·n², K]`` and its image's target.

    ``exp_softmax``: ``exp(p_j)`` (paper); ``exp_softmax_max``: ``exp(p_j) / max_j' exp(p_j')`` per image (official
    ``--score``); ``softmax``: ``p_j``; ``sigmoid``: ``σ(f_k(P_j))`` (multi-label models); ``none``: 1."""
    rows = torch.arange(len(logits), device=logits.device)
    if weighting == "none":
        return logits.new_ones(len(logits))
    if weighting == "sigmoid":
        return torch.sigmoid(logits[rows, targets])
    p = logits.softmax(dim=1)[rows, targets]
    if weighting == "softmax":
        return p
    y = p.exp()
    if weighting == "exp_softmax":
        return y
    if weighting == "exp_softmax_max":
        per_image = y.view(-1, crops_per_image)
        return (per_image / per_image.max(dim=1, keepdim=True).values).flatten()
    raise InputError(f"unknown weighting {weighting!r}; use exp_softmax, exp_softmax_max, softmax, sigmoid or none")


def _partial_explainer(method: str | PartialExplainer, params: dict) -> tuple[PartialExplainer, bool]:
    """A function (model, crops, targets) → maps ``[P, h, w]`` for the base method, and whether it is a CAM."""
    if callable(method):
        return method, False
    if not isinstance(method, str):
        raise InputError(f"method must be a method name or a callable (model, crops, targets) -> maps, "
                         f"got {type(method).__name__}")
    if method == "ucag":
        raise InputError("UCAG cannot wrap itself")
    if method not in REGISTRY:
        raise InputError(f"unknown base method {method!r}; see fxrel.methods()")
    is_cam = method in CAM_METHODS
    if is_cam:  # the CAM family: signed maps at the layer's resolution, post-processed as in the official code
        params = {"upsample": None, **params, "relu": False}

    def run(model: nn.Module, crops: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return explain(model, crops, target=targets, method=method, **params)
    return run, is_cam


def _as_maps(relevance: torch.Tensor, rows: int) -> torch.Tensor:
    if relevance.dim() == 4:
        relevance = relevance.sum(dim=1)
    if relevance.dim() != 3 or len(relevance) != rows:
        raise InputError(f"the base method returned shape {tuple(relevance.shape)} for {rows} crops; UCAG needs a "
                         "map per crop, [crops, H, W] or [crops, C, H, W]")
    return relevance


def ucag(model: nn.Module, x: torch.Tensor, target: object = None, method: str | PartialExplainer = "grad_cam", *,
         n: int = 6, rho: float = 0.75, alpha: float | Literal["input"] = "input", weighting: Weighting = "exp_softmax",
         blend: Blend = "gaussian", blend_sigma: float = 0.125, average: Average = "coverage",
         postprocess: Literal["auto", "cam", "none"] = "auto", center: bool = False, chunk_size: int = 16,
         method_params: dict | None = None) -> torch.Tensor:
    """UCAG map ``[N, H, W]`` of ``method`` for the batch ``x`` (see the module docstring for the equations).

    ``target``: as in :meth:`fxrel.Explainer.attribute`, resolved once on the full images (``None``: predicted
    class); every crop of image ``i`` is explained for image ``i``'s class. ``method``: any name in
    ``fxrel.methods()`` (its parameters in ``method_params``) or a callable ``(model, crops, targets) → maps``.
    ``blend``/``blend_sigma``: the fold's window (``"uniform"``, ``average="coverage"``: the paper's Eq. 5–6;
    ``"uniform"``, ``"coverage_plus_one"``: the official code's).
    ``chunk_size``: crops per explanation call (the memory bound). ``postprocess``: ``"auto"`` (CAM family:
    ReLU, min–max, blur; otherwise none), ``"cam"`` or ``"none"``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InputError(f"x must be a batch of images [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if not torch.isfinite(x).all():
        raise InputError("x contains NaN or infinite values")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if postprocess not in ("auto", "cam", "none"):
        raise InputError(f"postprocess must be 'auto', 'cam' or 'none', got {postprocess!r}")
    if weighting not in WEIGHTINGS:
        raise InputError(f"unknown weighting {weighting!r}; use one of {list(WEIGHTINGS)}")
    if average not in AVERAGES:
        raise InputError(f"average must be one of {list(AVERAGES)}, got {average!r}")
    blend_window((1, 1), blend, blend_sigma)  # a bad blend or σ is named before any explanation runs
    explain_crops, is_cam = _partial_explainer(method, dict(method_params or {}))
    geometry = unfold_geometry(x.shape[-2], x.shape[-1], n=n, rho=rho, alpha=alpha)
    targets = resolve_targets(model, x, target)
    crops = unfold(x, geometry)
    per_image = len(geometry.windows)
    crop_targets = targets.repeat_interleave(per_image)
    maps, logits = [], []
    for rows, used in padded_chunks(len(crops), min(chunk_size, len(crops)), x.device):
        chunk = crops[rows]
        maps.append(_as_maps(explain_crops(model, chunk, crop_targets[rows]), len(rows))[:used].detach())
        with torch.no_grad():
            logits.append(model(chunk)[:used])
    partial = torch.cat(maps)
    if center:
        partial = partial - partial.mean(dim=(1, 2), keepdim=True)
    weights = confidence_weights(torch.cat(logits), crop_targets, per_image, weighting).to(partial.dtype)
    out = fold(partial, weights, geometry, average, blend, blend_sigma)
    if postprocess == "cam" or (postprocess == "auto" and is_cam):
        out = gaussian_blur(minmax_normalise(out.clamp(min=0)), kernel_size=5, sigma=3.0)
    return out


def _ucag_over_base(model: nn.Module, x: torch.Tensor, target: object = None, base: str = "grad_cam",
                    base_params: dict | None = None, **params) -> torch.Tensor:
    return ucag(model, x, target, method=base, method_params=base_params, **params)


register_wrapper("ucag", _ucag_over_base,
                 "UCAG of any method (base=NAME): n² crops (3/4 of the image) up-scaled to the "
                 "input size (the paper's rho=0.555, alpha=2.6: 1.44×) explained as one batch, confidence-weighted and "
                 "folded back under a Gaussian window (blend='uniform': the paper)", "Hong et al. 2023",
                 "[N, H, W] at the input's size; CAM bases: in [0, 1] (ReLU, min–max, blur), others: signed",
                 {"base": "grad_cam", "base_params": None,
                  **{k: v for k, v in signature_defaults(ucag, skip=4).items() if k != "method_params"}})
