"""LRP rules as instances of the generic propagation rule (:mod:`fxrel.rules.generic`).

Notation: ``z_ij = x_i w_ij``, ``(·)⁺ = max(·, 0)``, ``(·)⁻ = min(·, 0)``. Parameter modifiers apply to weight and
bias alike, as in zennit, so the presets reproduce zennit's numbers.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fxrel.errors import RuleError
from fxrel.rules.generic import GenericRule, Group, Term, absolute, ones, single, split_signs
from fxrel.sample_images import IMAGENET_MEAN, IMAGENET_STD


def weights_pos(p: torch.Tensor) -> torch.Tensor:
    """Parameter modifier ``W⁺ = max(W, 0)`` (cached under the tag ``"pos"``)."""
    return p.clamp(min=0)


def weights_neg(p: torch.Tensor) -> torch.Tensor:
    """Parameter modifier ``W⁻ = min(W, 0)`` (cached under the tag ``"neg"``)."""
    return p.clamp(max=0)


def Epsilon(epsilon: float = 1e-6) -> GenericRule:
    """LRP-ε (Bach et al. 2015; Montavon et al. 2019 Eq. 8): ``R_i = Σ_j z_ij / (z_j + ε·sign z_j) · R_j``,
    bias included in ``z_j``. ``epsilon=0`` gives LRP-0 (Eq. 7) up to the zero-denominator guard."""
    return single(Term(), epsilon, f"Epsilon(epsilon={epsilon:g})")


def Norm(stabilizer: float = 1e-6) -> GenericRule:
    """The z-rule for parameter-free linear ops (sums, average pooling): ``R_i = x_i · R / stab(Σ x)``."""
    return single(Term(), stabilizer, f"Norm(stabilizer={stabilizer:g})")


def AbsNorm() -> GenericRule:
    """The absolute-influence split for parameter-free linear ops: ``R_i = |x_i| · R / Σ_k |x_k|`` — conserving,
    and bounded by ``|R|`` where the signed z-rule amplifies (residual sums whose operands nearly cancel)."""
    return single(Term(absolute, tag="abs"), 0.0, "AbsNorm()")


def SumSplit(absolute: bool, stabilizer: float = 0.0) -> GenericRule:
    """The split of a parameter-free sum (:data:`fxrel.graphs.ops.SUM_KINDS`): :func:`AbsNorm` (``absolute``) or
    the signed z-rule :func:`Norm`."""
    return AbsNorm() if absolute else Norm(stabilizer)


def ZPlus(stabilizer: float = 1e-6, ignore_bias: bool = False) -> GenericRule:
    """z⁺ / α1β0 (Montavon et al. 2017, DTD): ``R_i = Σ_j (x_i⁺w_ij⁺ + x_i⁻w_ij⁻) / Σ_i' (…) · R_j``; the positive
    bias ``b⁺`` joins the denominator unless ``ignore_bias`` (the CLRP/RAP/innvestigate variant)."""
    pos, neg = split_signs(weights_pos, weights_neg, "pos", (1, -1))
    terms = (Term(pos.input, pos.param, pos.tag, zero_bias=True, param_sign=1), neg) if ignore_bias else (pos, neg)
    name = f"ZPlus(stabilizer={stabilizer:g}{', ignore_bias=True' if ignore_bias else ''})"
    return GenericRule((Group(terms),), stabilizer, name)


def AlphaBeta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> GenericRule:
    """LRP-αβ (Bach et al. 2015, Eq. 60): ``R_i = Σ_j (α p_ij / Σ p_·j − β n_ij / Σ n_·j) R_j`` with the positive
    contributions ``p = x⁺w⁺ + x⁻w⁻`` and the negative ones ``n = x⁺w⁻ + x⁻w⁺``. Requires ``α − β = 1``."""
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
        raise ValueError(f"AlphaBeta needs alpha, beta ≥ 0 and alpha − beta = 1 (got alpha={alpha}, beta={beta})")
    return GenericRule(
        (Group(split_signs(weights_pos, weights_neg, "pos", (1, -1)), alpha),
         Group(split_signs(weights_neg, weights_pos, "neg", (-1, 1)), -beta)),
        stabilizer, f"AlphaBeta(alpha={alpha:g}, beta={beta:g})")


def Gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> GenericRule:
    """Generalised LRP-γ (Montavon et al. 2019 Eq. 9; Andéol et al. 2021): outputs ``z_j > 0`` are explained by the
    positive contributions with weights ``w + γw⁺`` (``w + γw⁻`` for ``x⁻``), outputs ``z_j < 0`` by the negative
    ones with ``w + γw⁻`` (``w + γw⁺`` for ``x⁻``). Equal to γ-LRP when ``x ≥ 0``."""
    def up(p: torch.Tensor) -> torch.Tensor:
        return p + gamma * p.clamp(min=0)

    def down(p: torch.Tensor) -> torch.Tensor:
        return p + gamma * p.clamp(max=0)

    g = f"{gamma:g}"
    return GenericRule(
        (Group(split_signs(up, down, f"gamma{g}up"), 1.0, lambda z: z > 0),
         Group(split_signs(down, up, f"gamma{g}down"), 1.0, lambda z: z < 0)),
        stabilizer, f"Gamma(gamma={g})")


def WSquare(stabilizer: float = 1e-6) -> GenericRule:
    """w² (Montavon et al. 2017, DTD for unbounded inputs): ``R_i = Σ_j w_ij² / Σ_i' w_i'j² · R_j``."""
    return single(Term(ones, lambda p: p * p, "square", param_sign=1), stabilizer, "WSquare()")


def Flat(stabilizer: float = 1e-6) -> GenericRule:
    """Flat (Lapuschkin et al. 2019): w² with all weights 1 — spreads ``R_j`` uniformly over its receptive field."""
    return single(Term(ones, torch.ones_like, "ones", zero_bias=True, param_sign=1), stabilizer, "Flat()")


def ZBox(low: float | str | Sequence[float] | torch.Tensor, high: float | str | Sequence[float] | torch.Tensor,
         stabilizer: float = 1e-6, ignore_bias: bool = False) -> GenericRule:
    """z^β / box rule (Montavon et al. 2017, Eq. in Sec. 4.3) for inputs bounded by ``l ≤ x ≤ h``:
    ``R_i = Σ_j (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) / Σ_i' (…) · R_j``. ``low``/``high`` are scalars, per-channel
    sequences, or both ``"image"`` (each image's own min/max over C, H, W). ``ignore_bias`` leaves the biases out
    (the RAP/RSP input rule)."""
    no_bias = ", ignore_bias=True" if ignore_bias else ""
    if isinstance(low, str) or isinstance(high, str):
        if (low, high) != ("image", "image"):
            raise RuleError(f"ZBox bounds: numbers, per-channel sequences, or both 'image' (got {low!r}, {high!r})")
        terms = (Term(zero_bias=ignore_bias), Term(_image_bound(torch.amin), weights_pos, "pos", ignore_bias, -1.0),
                 Term(_image_bound(torch.amax), weights_neg, "neg", ignore_bias, -1.0))
        return GenericRule((Group(terms),), stabilizer, f"ZBox(low=image min, high=image max{no_bias})")
    lo, hi = _bound(low), _bound(high)

    def at(bound: torch.Tensor):
        def modifier(x, ctx):
            channels = _input_shape(ctx)[1]
            if bound.numel() > 1 and bound.shape[1] != channels:
                raise RuleError(f"ZBox bounds have {bound.shape[1]} channels but the input of node "
                                f"'{ctx.node.name}' has {channels}; give low/high per channel or as scalars")
            return torch.zeros_like(x) + ctx.constant(bound)
        return modifier

    terms = (Term(zero_bias=ignore_bias), Term(at(lo), weights_pos, "pos", ignore_bias, -1.0),
             Term(at(hi), weights_neg, "neg", ignore_bias, -1.0))
    return GenericRule((Group(terms),), stabilizer, f"ZBox(low={_show(lo)}, high={_show(hi)}{no_bias})")


def _image_bound(reduce):
    """Input modifier: the per-image minimum or maximum of the input over C, H, W (the RAP/RSP/AGF baselines'
    bounds, LRP spec §2.1 (c))."""
    def modifier(x, ctx):
        return torch.zeros_like(x) + reduce(x.flatten(1), 1).view(-1, *([1] * (len(_input_shape(ctx)) - 1)))
    return modifier


def _input_shape(ctx) -> torch.Size:
    return ctx.node.args[0].meta["tensor_meta"].shape


def _bound(value: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    return t.reshape(1, -1, 1, 1) if t.dim() == 1 else t


def _show(t: torch.Tensor) -> str:
    return f"{t.item():.4g}" if t.numel() == 1 else "[" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + "]"


def bounds_from_normalization(mean: Sequence[float], std: Sequence[float],
                              pixel_range: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(low, high)`` of normalised pixels: ``((lo − μ_c)/σ_c, (hi − μ_c)/σ_c)`` (LRP spec §2.1 (a))."""
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return (pixel_range[0] - m) / s, (pixel_range[1] - m) / s


#: Per-channel bounds of ImageNet-normalised pixels in [0, 1]: the default box of ZBox-based methods.
IMAGENET_LOW, IMAGENET_HIGH = (tuple(round(v, 6) for v in b.tolist())
                               for b in bounds_from_normalization(IMAGENET_MEAN, IMAGENET_STD))
