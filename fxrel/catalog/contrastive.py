"""Contrastive methods: CLRP1/CLRP2 (Gu et al. 2018), SGLRP (Iwana et al. 2019), excitation backprop and its
contrastive form c-MWP (Zhang et al. 2016), and the LRP presets the papers' code ran them with.

Each method is one relevance sweep with two streams — the target and its dual concept — batched in one graph;
a ``combine`` step recorded into the same graph turns the pair into the result (see ``specs/clrp.md``,
``specs/sglrp.md``):

* CLRP target seed ``R = y_t e_t``. CLRP1's dual: ``y_t/(C−1)`` on every other class. CLRP2's dual: ``y_t e_t``
  through a last layer whose weights are negated.
* SGLRP seeds from the softmax Jacobian row: target ``(p_t(1−p_t) + 10⁻⁸) e_t``, dual ``p_t p_n`` for ``n ≠ t``.
* combine ``paper``: ``max(0, R − R_dual)``; ``difference``: ``R − R_dual``; ``official``: ``R/ΣR − R_dual/ΣR_dual``;
  ``agf`` (and SGLRP's scaling): ``R − R_dual · ΣR/ΣR_dual`` (sums over all but the batch axis; a vanishing dual sum
  returns ``R``).

On transformers (ViT, DeiT, Swin …) CLRP, SGLRP and contrastive excitation backprop run unchanged: their layer rules
apply to the linear layers, and attention follows the structural default (attention weights constant, CP-LRP;
``attention="attnlrp"`` is a parameter of the LRP rule sets, not of these presets).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxrel.catalog.method import CONSERVING, IMAGE_BOUND, Method, StreamSpec, seed_gradient, seed_logit
from fxrel.catalog.registry import register
from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, first, kind, last
from fxrel.rules.generic import divide, dtype_of, stabilizer_for
from fxrel.rules.gradient import Gradient, Pass
from fxrel.rules.lrp import Norm, SumSplit, WSquare, ZBox, ZPlus

#: The scalar box of CLRP's official code, the extremes of ImageNet-normalised pixels (``low=CLRP_LOW,
#: high=CLRP_HIGH`` reproduces it; the default is each image's own min/max).
CLRP_LOW, CLRP_HIGH = -2.1179, 2.64


# --- LRP presets -------------------------------------------------------------------------------------------------
#: How a preset treats sums, average pooling and centring: ``"absolute"`` (default) splits by each operand's
#: absolute share, ``R_i = |x_i| / Σ|x| · R`` (:func:`fxrel.rules.lrp.AbsNorm`: conserving, and bounded by ``|R|``);
#: ``"z_rule"`` by its signed share, ``R_i = x_i ⊙ R / Σ x``; ``"official"`` is what the papers' VGG-only code did
#: there — CLRP's uniform average pooling (``R/k``), innvestigate's gradient mapping for pools *and sums* (which
#: copies ``R`` to both operands of a residual sum, doubling it at every block). Measured on the evaluation zoo (12
#: scenes, 29 pairs): on the BasicBlock ResNet the official sums give ``lrp_zplus_box`` a pointing game of 0.21 and
#: ``lrp_deep_taylor`` 0.45 (ΣR = 72.8 for logits ≈ 5), both 1.00 with either split. On DenseNet-BC the transition
#: average-pools a convolution's output that no ReLU has made non-negative, so window sums nearly cancel and the
#: signed split sends ``x_i/Σx ≫ 1`` of ``R`` to single units — isolated hot pixels: pointing game of CLRP 0.45, of
#: SGLRP 0.41 with the signed split, 0.93 and 1.00 with the absolute one (their discrimination 0.85 → 0.91 and
#: 0.89 → 0.96). Where the operands are non-negative (a global pooling after a ReLU) the two splits are the same.
#: On VGG-16 at 224 px, the official code's setting, all three agree (its adaptive pool is the identity and it has
#: no sums).
SUMS = ("absolute", "z_rule", "official")


def lrp_preset(preset: str, low: Any = IMAGE_BOUND, high: Any = IMAGE_BOUND, sums: str = "absolute") -> Composite:
    """The LRP composites the contrastive papers ran (LRP spec §4):

    * ``zplus_box`` (CLRP paper/code): z⁺ without bias in every conv and linear layer, z^β with ``low``/``high`` at
      the first conv (default each image's min/max; the official code's ``CLRP_LOW``/``CLRP_HIGH`` when asked),
      max-pool winner-take-all, BatchNorm passed through;
    * ``rap`` (the RAP repo's ``relprop(alpha=1)``, AGF/UCAG's LRP baseline): α1β0 without bias, z^β with each
      image's min/max at the first conv, BatchNorm passed through;
    * ``deep_taylor`` (innvestigate's BoundedDeepTaylor, official SGLRP): w² for the classifier (the last conv or
      linear layer), α1β0 without bias for every other layer, z^β with ``low``/``high`` at the first layer.
      innvestigate gives w² to every layer without a ReLU of its own; on VGG that is the classifier alone, but on a
      ResNet it is every conv feeding a residual sum, and w² ignores the input (zoo BasicBlock ResNet, 26 pairs:
      pointing game 0.14 that way, 1.00 this way).

    Sums, average pooling and centring: see :data:`SUMS` (``sums="official"`` for the papers' own handling).
    """
    if sums not in SUMS:
        raise RuleError(f"unknown sums '{sums}'; use one of {', '.join(SUMS)}")
    stabilizer = 1e-9
    zplus = ZPlus(stabilizer, ignore_bias=True)
    common = [(kind(ops.ACTIVATION, ops.AFFINE), Pass())]
    z_rule = [(kind(*ops.SUM_KINDS), Norm(stabilizer))]
    split = [(kind(*ops.SUM_KINDS), SumSplit(sums == "absolute", stabilizer))]
    if preset == "zplus_box":
        pairs = [(first(ops.CONV), ZBox(low, high, stabilizer)), (kind(ops.CONV, ops.LINEAR), zplus)]
        official = [(kind(ops.ADD), Norm(stabilizer)), (kind(ops.AVGPOOL, ops.CENTER), Gradient())]
    elif preset == "rap":
        pairs = [(first(ops.CONV), ZBox("image", "image", stabilizer)), (kind(ops.CONV, ops.LINEAR), zplus)]
        official = z_rule
    elif preset == "deep_taylor":
        pairs = [(first(), ZBox(low, high, stabilizer)), (last(), WSquare(stabilizer)),
                 (kind(ops.CONV, ops.LINEAR), zplus)]
        official = [(kind(*ops.SUM_KINDS), Gradient())]
    else:
        raise RuleError(f"unknown LRP preset '{preset}'; use zplus_box, rap or deep_taylor")
    return Composite(pairs + (official if sums == "official" else split) + common, f"lrp[{preset}, sums={sums}]")


@register("lrp_zplus_box", "CLRP paper's LRP: z⁺ without bias, z^β first conv, WTA max-pool", "LRP spec §4",
          CONSERVING)
def _lrp_zplus_box(low: Any = IMAGE_BOUND, high: Any = IMAGE_BOUND, sums: str = "absolute") -> Method:
    return Method("lrp_zplus_box", lrp_preset("zplus_box", low, high, sums), seed_logit)


@register("lrp_rap", "RAP repo relprop(alpha=1): α1β0, z^β with per-image bounds (AGF/UCAG baseline)",
          "LRP spec §4", CONSERVING)
def _lrp_rap(sums: str = "absolute") -> Method:   # z^β bounds: always the image's own
    return Method("lrp_rap", lrp_preset("rap", sums=sums), seed_logit)


@register("lrp_deep_taylor", "innvestigate BoundedDeepTaylor: α1β0, w² classifier, z^β first layer", "LRP spec §4",
          CONSERVING)
def _lrp_deep_taylor(low: Any = IMAGE_BOUND, high: Any = IMAGE_BOUND, sums: str = "absolute") -> Method:
    return Method("lrp_deep_taylor", lrp_preset("deep_taylor", low, high, sums), seed_logit)


# --- CLRP2's negated last layer ----------------------------------------------------------------------------------
class Negated(Rule):
    """``rule`` applied to the layer with its weights negated (CLRP2's dual concept ``W̄ = −W`` in the last layer)."""

    kinds = frozenset({ops.CONV, ops.LINEAR})

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        negated = ctx.replace(weight=ctx.param("weight", "negated", torch.neg), output=-ctx.output,
                              bias=None if ctx.bias is None else ctx.param("bias", "negated", torch.neg),
                              param_transform=("negated", torch.neg))
        return self.rule(negated, relevance)

    def __repr__(self) -> str:
        return f"Negated({self.rule!r})"


# --- seeds -------------------------------------------------------------------------------------------------------
def _target_logit(output: Any, mask: Any) -> Any:
    return (output * mask).sum(-1, keepdim=True)


def seed_clrp1_dual(output: Any, mask: Any) -> Any:
    """CLRP1's dual concept: the target score spread uniformly over the other classes, ``y_t/(C−1)``."""
    others = 1 - mask
    return _target_logit(output, mask) / others.sum(-1, keepdim=True) * others


def seed_sglrp_target(output: Any, mask: Any) -> Any:
    """SGLRP's target seed ``(p_t(1 − p_t) + 10⁻⁸) e_t`` (∂p_t/∂y_t, kept away from 0)."""
    p = torch.softmax(output, -1)
    return (p * (1 - p) + stabilizer_for(1e-8, dtype_of(output))) * mask


def seed_sglrp_dual(output: Any, mask: Any) -> Any:
    """SGLRP's dual seed ``p_t p_n`` for ``n ≠ t`` (the magnitude of ∂p_t/∂y_n)."""
    p = torch.softmax(output, -1)
    return p * (p * mask).sum(-1, keepdim=True) * (1 - mask)


# --- combining the two streams -----------------------------------------------------------------------------------
def _sums(r: Any) -> Any:
    return r.flatten(1).sum(1, keepdim=True)


def _scaled_difference(target: Any, dual: Any) -> Any:
    """``R − R_dual · ΣR/ΣR_dual``; where ``ΣR_dual = 0`` the dual is dropped."""
    ratio = divide(_sums(target), _sums(dual), 0.0)  # the generic rule's zero-safe division
    return (target.flatten(1) - dual.flatten(1) * ratio).view_as(target)


def _normalised_difference(target: Any, dual: Any) -> Any:
    t, d = target.flatten(1), dual.flatten(1)
    st, sd = _sums(target), _sums(dual)

    def safe(s: Any) -> Any:
        return torch.where(s == 0, 1.0, s)
    return (t / safe(st) - d / safe(sd)).view_as(target)


COMBINE: dict[str, Callable[[Any, Any], Any]] = {
    "paper": lambda t, d: torch.relu(t - d),
    "difference": lambda t, d: t - d,
    "official": _normalised_difference,
    "agf": _scaled_difference,
}


def _combiner(name: str, target: str, dual: str, relu: bool = False) -> Callable[[dict[str, Any]], Any]:
    if name not in COMBINE:
        raise RuleError(f"unknown combine '{name}'; use one of {', '.join(COMBINE)}")
    fn = COMBINE[name]

    def combine(parts: dict[str, Any]) -> Any:
        out = fn(parts[target], parts[dual])
        return torch.relu(out) if relu else out
    return combine


# --- the methods -------------------------------------------------------------------------------------------------
@register("clrp", "contrastive LRP: target minus dual concept (variant 1: other classes; 2: negated last layer)",
          "Gu et al. 2018 (CLRP)", "combine='paper': max(0, R − R_dual) ≥ 0; 'difference' signed; 'official' "
          "R/ΣR − R_dual/ΣR_dual and 'agf' R − R_dual·ΣR/ΣR_dual sum to 0")
def _clrp(variant: int = 1, combine: str = "paper", preset: str = "zplus_box", low: Any = IMAGE_BOUND,
          high: Any = IMAGE_BOUND, sums: str = "absolute") -> Method:
    composite = lrp_preset(preset, low, high, sums)
    if variant == 1:
        dual = StreamSpec("clrp_dual", composite, seed_clrp1_dual)
    elif variant == 2:
        negated = Negated(ZPlus(1e-9, ignore_bias=True) if preset != "deep_taylor" else WSquare(1e-9))
        dual = StreamSpec("clrp_dual", composite.with_rules([(last(ops.LINEAR), negated)]), seed_logit)
    else:
        raise RuleError(f"CLRP variant must be 1 or 2, got {variant!r}")
    merge = None if combine == "none" else _combiner(combine, "clrp", "clrp_dual")
    return Method("clrp", composite, seed_logit, extra=(dual,), combine=merge)


@register("sglrp", "softmax-gradient LRP: target and softmax-weighted rest, scaled and subtracted",
          "Iwana et al. 2019 (SGLRP)", "signed A^T − A^D·ΣA^T/ΣA^D (Σ = 0; relu=True keeps the positive part)")
def _sglrp(preset: str = "zplus_box", scaling: bool = True, relu: bool = False, low: Any = IMAGE_BOUND,
           high: Any = IMAGE_BOUND, sums: str = "absolute") -> Method:
    """SGLRP. Default LRP: ``zplus_box`` (z⁺ in the classifier too). The official code's innvestigate DeepTaylor
    (``preset="deep_taylor"``) gives the classifier w², which ignores the input and the weights' sign, so both
    streams start from every channel the classifier weighs heavily, active or not, for or against the class; on the
    zoo's BasicBlock ResNet (26 pairs) its pointing game is 0.34 against 1.00 with ``zplus_box``."""
    composite = lrp_preset(preset, low, high, sums)
    dual = StreamSpec("sglrp_dual", composite, seed_sglrp_dual)
    merge = _combiner("agf" if scaling else "difference", "sglrp", "sglrp_dual", relu)
    return Method("sglrp", composite, seed_sglrp_target, extra=(dual,), combine=merge)


# --- excitation backprop -----------------------------------------------------------------------------------------
def excitation_composite() -> Composite:
    """Excitation backprop's rules (Zhang et al. 2016, Eq. 6; TorchRay's implementation, specs/rsp.md): the marginal
    winning probability ``p_in = x ⊙ f*(W⁺; p_out / (f(x; W⁺) + 10⁻²⁰))`` in conv/linear layers (bias dropped), the
    same with positive unit weights in average pooling and sums, the plain gradient through ReLU and max-pooling,
    BatchNorm as the identity."""
    eps = 1e-20
    return Composite([(kind(ops.CONV, ops.LINEAR), ZPlus(eps, ignore_bias=True)),
                      (kind(*ops.SUM_KINDS), Norm(eps)), (kind(ops.AFFINE), Pass()),
                      (kind(ops.ACTIVATION), Gradient())],
                     "excitation_backprop")


def excitation_dual_composite() -> Composite:
    """Contrastive MWP's dual (Zhang et al. 2016): excitation backprop through a classifier with negated weights."""
    return excitation_composite().with_rules([(last(ops.LINEAR), Negated(ZPlus(1e-20, ignore_bias=True)))])


@register("excitation_backprop", "excitation backprop: marginal winning probabilities (read at any layer via stops)",
          "Zhang et al. 2016 (EB)", "probabilities ≥ 0 summing to 1 at every layer")
def _excitation_backprop() -> Method:
    return Method("excitation_backprop", excitation_composite(), seed_gradient)


@register("contrastive_excitation_backprop",
          "contrastive MWP: target minus the dual with negated classifier weights", "Zhang et al. 2016 (c-MWP)",
          "signed difference of two probability maps (Σ = 0); combine='paper' clamps")
def _contrastive_excitation_backprop(combine: str = "difference") -> Method:
    dual = StreamSpec("excitation_dual", excitation_dual_composite(), seed_gradient)
    merge = None if combine == "none" else _combiner(combine, "excitation", "excitation_dual")
    return Method("excitation", excitation_composite(), seed_gradient, extra=(dual,), combine=merge)
