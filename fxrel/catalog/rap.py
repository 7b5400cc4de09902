"""RAP: Relative Attributing Propagation (Nam, Gur, Choi, Wolf, Lee, AAAI 2020), after the official code
(``specs/rap.md``; section numbers below refer to it).

Rule per canonical node (``x`` a layer's input, ``R`` the relevance at its output, sums per sample):

* **last linear layer** — the first propagation (§2, :class:`FirstPropagation`): the contributions ``C`` of the
  four sign blocks ``x^±W^±`` plus the bias split between the ``pp`` and ``pn`` blocks (``C`` sums to ``y_t``).
  ``first_prop="signed"`` (default) passes ``C`` down as it is; ``first_prop="official"`` applies the influence
  redistribution ``R_i = |C_i| · ΣC / Σ|C|`` — every unit gets the sign of ``y_t``. The official code takes this step
  only when the seed's maximum is exactly 1 (seed ``e_t``); any other seed, and every seed with
  ``first_prop="generic"`` (AGF/UCAG's ``y_t e_t``), goes through the dense rule.
* **convolutions** — relevant and irrelevant contributions (§3.1, :func:`layer_rule`), bias dropped:
  ``Za1 = f(x⁺; W⁺)``, ``Za2 = f(x⁺; |W⁻|)``, ``D = Za1 + Za2``::

      conv:   C = x⁺⊙f*(W⁺; R⁺/Za1) + x⁺⊙f*(|W⁻|; R⁻/Za2) + x⁺⊙f*(|W⁻|; R/D)
      linear: C = x⁺⊙f*(W⁺; R/Za1)                      + x⁺⊙f*(|W⁻|; R/D)

  (the spec's second and fourth terms ``R⁺/D`` and ``R⁻/D`` are merged; ``/`` is the zero-safe ``sdiv``), followed
  by the uniform shift ``C ← C − (ΣC − ΣR)/N_nz(C) · 1[C≠0]`` (:class:`fxrel.rules.shift.Shifted`). With
  ``negative_inputs=True`` the ``x⁻`` half (``−f(x⁻;W⁺)``, ``f(x⁻;W⁻)`` in the places of ``Za1``, ``Za2``) is added with
  its own shift, as the official code does — ``ΣR`` is then counted twice; it is off by default (after a ReLU it is
  zero anyway).
* **dense layers** — ``dense="signed"`` (default): the bias-free z-rule ``R_i = Σ_j x_i w_ij / Σ_i' x_i' w_i'j · R_j``
  (:func:`signed_dense`); ``dense="rap"``: the linear form of the layer rule above, as the official code.

* **input convolution** (reads the model input) — z^β with each image's min/max, no bias, ``sdiv`` (§3.2).
* **ReLU, BatchNorm** (an unfolded affine; BatchNorm after a conv is folded into it) — identity (§3.3). The
  official BatchNorm rule is the identity up to its ``sdiv`` zeroing units with ``x·γ/σ = 0``; that mask is not
  reproduced, as it would drop relevance at DenseNet's pre-activation BatchNorms (zero input, live output).
* **residual sums, average pooling, centring** — ``residual="absolute"`` (default): RAP's own absolute-influence
  split ``R_a = |a| / Σ|·| · R``. The official signed z-rule ``R_a = a ⊙ sdiv(R, Σ·)`` (``residual="official"``, §3.3)
  conserves too but amplifies where the operands nearly cancel: a BatchNorm'd branch output against a ReLU'd skip
  (measured on the trained demo ResNet, the last block's ΣR = 5.6 was split into +44.7 (branch) and −39.1 (skip),
  compounding block by block into isolated hot pixels: pointing game 0.11 over 36 pairs, against 1.00 for RSP on
  the same model), and DenseNet's transition, which average-pools a convolution's signed output (zoo-densenet, 29
  pairs: pointing game 0.66 with the z-rule at the pooling, 1.00 with the absolute split; discrimination 0.89 →
  0.95). After a ReLU (non-negative operands) the two are the same.
* **max pooling** — winner-take-all. The official z-rule ``x ⊙ ∇pool(x)ᵀ sdiv(R, pool(x))`` is the same wherever
  ``pool(x) ≠ 0`` and drops ``R`` where the whole window is 0; that happens in DenseNet, whose pre-activation
  BatchNorm shifts zeros into live units, so winner-take-all is used to keep ``ΣR = y_t``.
* **concatenation** — slicing (§3.3); padding and shape ops — their exact VJP.

Why the defaults depart from the official code (``first_prop="official", dense="rap"``): RAP's absolute influence
gives a unit relevance for the *size* of its contribution whatever its sign, so the units that vote *against* the
target — the other objects' detectors — receive the target's relevance. In a convolution those units sit in the
same receptive field and the uniform shift keeps the map local; at the classifier and in the dense layers after a
flatten they sit anywhere in the image. Measured on the evaluation zoo (``fxrel fidelity --methods rap``, 12
scenes, 29 pairs): with the official settings the class discrimination is 0.40–0.56 on all six models (0.5 is what a
map gets that cannot tell two objects apart), below LRP-αβ's 0.66–0.95; the channel-summed relevance entering
zoo-resnet's global pooling already has 0.41. With signed contributions at the classifier it is 0.93 there and at
the input, and 0.89–0.97 on the six models (zoo-vgg 0.72 until its dense layer is signed too: 0.91); on 40 scenes
zoo-resnet 0.964 and zoo-vgg 0.954 against LRP-αβ's 0.960 and 0.810. The convolutions keep RAP's rule and shift.

Forks are sums for every architecture: a value used by several nodes receives the sum of what each sends back (the
builder does this). This is the official Bottleneck behaviour (residual branch + skip after the downsample's rules).
The official BasicBlock ``Clone`` multiplies the positive and negative parts instead (and fails to unpack its
input) — a bug; here BasicBlocks, DenseNet's concatenations and Inception's branches all use the same sum, so
``Σ R = y_t`` holds at every node that all paths pass through, for any architecture (§6.1).

On transformers RAP runs unchanged: its layer rule applies to every linear layer, the attention weights stay
constant (the structural default, CP-LRP), and its residual-sum rule splits the transformer's residual sums as it
splits a ResNet's.
"""
from __future__ import annotations

from typing import Any

import torch

from fxrel.catalog.method import Method, seed_gradient, seed_logit
from fxrel.catalog.registry import register
from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, kind, last, reads_input
from fxrel.rules.generic import (
    GenericRule,
    Group,
    Term,
    divide,
    negative,
    negative_relevance,
    positive,
    positive_relevance,
)
from fxrel.rules.gradient import Pass
from fxrel.rules.lrp import SumSplit, ZBox, weights_neg, weights_pos
from fxrel.rules.shift import Shifted, total

#: (Za1, Za2) for x⁺: the positive contributions f(x⁺; W⁺) and the magnitudes of the negative ones f(x⁺; |W⁻|)
_X_POS = (Term(positive, weights_pos, "pos", zero_bias=True), Term(positive, weights_neg, "neg", True, -1.0))
#: (Zb1, Zb2) for x⁻: the magnitudes −f(x⁻; W⁺) of its negative contributions and f(x⁻; W⁻) of its positive ones
_X_NEG = (Term(negative, weights_pos, "pos", True, -1.0), Term(negative, weights_neg, "neg", zero_bias=True))


def layer_rule(first: Term, second: Term, linear: bool) -> GenericRule:
    """§3.1 before the shift, for the contributions ``Za1 = f(first)`` and ``Za2 = f(second)``."""
    if linear:  # the official Linear sends R⁻ through the positive contributors as well (its third term)
        relevant = (Group((first,)),)
    else:
        relevant = (Group((first,), relevance=positive_relevance), Group((second,), relevance=negative_relevance))
    shares = Group((second,), denominator=(first, second))  # an extra share Za2/D of R to the negative contributors
    return GenericRule(relevant + (shares,), 0.0, f"RAP({'linear' if linear else 'conv'})")


class RAPLayer(Rule):
    """§3.1 for a conv or linear layer: the layer rule on ``x⁺`` shifted back to ``ΣR`` (and, with
    ``negative_inputs``, the same on ``x⁻`` with its own shift, added)."""

    kinds = frozenset({ops.CONV, ops.LINEAR})

    def __init__(self, linear: bool, negative_inputs: bool = False) -> None:
        self.positive = Shifted(layer_rule(*_X_POS, linear))
        self.negative = Shifted(layer_rule(*_X_NEG, linear)) if negative_inputs else None

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (result,) = self.positive(ctx, relevance)
        if self.negative is not None and not ctx.nonnegative:
            result = result + self.negative(ctx, relevance)[0]
        return [result]

    def __repr__(self) -> str:
        return f"RAPLayer({self.positive!r}{', negative_inputs=True' if self.negative else ''})"


def signed_dense() -> GenericRule:
    """``dense="signed"``: the bias-free z-rule ``R_i = Σ_j x_i w_ij · sdiv(R_j, Σ_i' x_i' w_i'j)`` — signed
    contributions, conserving; the bias is dropped and ``sdiv`` used as in RAP's own layer rule."""
    return GenericRule((Group((Term(zero_bias=True),)),), 0.0, "RAP(dense, signed)")


def influence(contributions: Any) -> Any:
    """§2, step 3: ``|C| · ΣC / Σ|C|`` — the magnitudes, rescaled to keep the total."""
    scale = divide(total(contributions), total(contributions.abs()), 0.0)
    return (contributions.abs().flatten(1) * scale).view_as(contributions)


class FirstPropagation(Rule):
    """§2 at the last linear layer, for samples whose relevance has maximum 1 (the official seed ``e_t``); the
    others go through ``general``. ``absolute`` (``first_prop="official"``) applies the influence redistribution;
    without it (``first_prop="signed"``) the contributions ``C`` are the relevance. With
    ``Pos = Σ_j R_j(pp_j + nn_j)`` and ``Neg = Σ_j R_j(pn_j + np_j)``::

        C = x ⊙ Wᵀ R                                           (the four sign blocks, each returned by its z-rule)
          + x⁺ ⊙ W⁺ᵀ sdiv(b⊙R · Pos/(Pos+Neg), f(x⁺;W⁺))     (the bias share of the pp block)
          + x⁺ ⊙ W⁻ᵀ sdiv(b⊙R · Neg/(Pos+Neg), f(x⁺;W⁻))     (the bias share of the pn block)
        R_in = |C| · ΣC / Σ|C|          (absolute)      R_in = C          (signed)

    A block's z-rule ``x^a ⊙ W^bᵀ sdiv(R⊙f(x^a;W^b), f(x^a;W^b))`` returns each contribution ``x_i w_ji`` itself (a
    zero block sum means every term of the block is 0), so the four blocks together are ``x ⊙ Wᵀ R``.
    """

    kinds = frozenset({ops.LINEAR})

    def __init__(self, general: Rule, absolute: bool = True) -> None:
        self.general, self.absolute = general, absolute

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        x = ctx.inputs[0]
        contributions = x * ctx.vjp(relevance)[0]
        if ctx.bias is not None:
            contributions = contributions + self._bias_shares(ctx, x, relevance)
        first = (influence(contributions) if self.absolute else contributions).flatten(1)
        official = relevance.flatten(1).amax(1, keepdim=True) == 1
        general = self.general(ctx, relevance)[0].flatten(1)
        return [torch.where(official, first, general).view_as(x)]

    @staticmethod
    def _bias_shares(ctx: RuleContext, x: Any, relevance: Any) -> Any:
        w_pos, w_neg = ctx.param("weight", "pos", weights_pos), ctx.param("weight", "neg", weights_neg)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        z_pp, z_pn = ctx.forward([x_pos], w_pos), ctx.forward([x_pos], w_neg)
        pos = total(relevance * (z_pp + ctx.forward([x_neg], w_neg)))
        neg = total(relevance * (z_pn + ctx.forward([x_neg], w_pos)))
        bias = ctx.bias * relevance
        to_pp = divide(bias * divide(pos, pos + neg, 0.0), z_pp, 0.0)
        to_pn = divide(bias * divide(neg, pos + neg, 0.0), z_pn, 0.0)
        return x_pos * (ctx.vjp(to_pp, w_pos)[0] + ctx.vjp(to_pn, w_neg)[0])

    def __repr__(self) -> str:
        return f"FirstPropagation({'absolute' if self.absolute else 'signed'}, else {self.general!r})"


FIRST_PROPS = ("signed", "official", "generic")
DENSE_RULES = ("signed", "rap")


def rap_composite(first_prop: str = "signed", negative_inputs: bool = False, residual: str = "absolute",
                  dense: str = "signed") -> Composite:
    """The RAP rule set (see the module docstring); ``first_prop="official", dense="rap"`` is the official code."""
    if first_prop not in FIRST_PROPS:
        raise RuleError(f"first_prop must be one of {', '.join(map(repr, FIRST_PROPS))}, got {first_prop!r}")
    if dense not in DENSE_RULES:
        raise RuleError(f"dense must be one of {', '.join(map(repr, DENSE_RULES))}, got {dense!r}")
    if residual not in ("absolute", "official"):
        raise RuleError(f"residual must be 'absolute' or 'official', got {residual!r}")
    conv = RAPLayer(False, negative_inputs)
    linear = RAPLayer(True, negative_inputs) if dense == "rap" else signed_dense()
    pairs = [(reads_input(ops.CONV), ZBox("image", "image", 0.0, ignore_bias=True))]
    if first_prop != "generic":
        pairs.append((last(ops.LINEAR), FirstPropagation(linear, absolute=first_prop == "official")))
    pairs += [(kind(ops.CONV), conv), (kind(ops.LINEAR), linear), (kind(ops.ACTIVATION, ops.AFFINE), Pass()),
              (kind(*ops.SUM_KINDS), SumSplit(absolute=residual == "absolute"))]
    return Composite(pairs, f"rap[{first_prop}, dense={dense}, residual={residual}]")


@register("rap", "relative attributing propagation: relevant/irrelevant split with uniform shifting in every "
          "convolution, signed contributions in the dense layers, z^β input (first_prop='official', dense='rap': "
          "the official code)", "Nam et al. 2020 (RAP)",
          "signed, shaped like the input; Σ R = y_t (the target logit) after every layer")
def _rap(first_prop: str = "signed", dense: str = "signed", negative_inputs: bool = False,
         residual: str = "absolute") -> Method:
    seed = seed_logit if first_prop == "generic" else seed_gradient  # official/signed: e_t; AGF/UCAG: y_t·e_t
    return Method("rap", rap_composite(first_prop, negative_inputs, residual, dense), seed)
