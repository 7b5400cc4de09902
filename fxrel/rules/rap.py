"""RAP: Relative Attributing Propagation (Nam, Gur, Choi, Wolf, Lee, AAAI 2020), as the official code computes it
(``specs/rap.md``; section numbers below refer to it).

Rule per canonical node (``x`` a layer's input, ``R`` the relevance at its output, sums per sample):

* **last linear layer** — the first propagation (§2, :class:`FirstPropagation`): the contributions ``C`` of the
  four sign blocks ``x^±W^±`` plus the bias split between the ``pp`` and ``pn`` blocks (``C`` sums to ``y_t``), then
  the influence redistribution ``R_i = |C_i| · ΣC / Σ|C|`` — every unit gets the sign of ``y_t``. The official
  code takes this step only when the seed's maximum is exactly 1 (``first_prop="official"``, seed ``e_t``); any
  other seed, and every seed with ``first_prop="generic"`` (AGF/UCAG's ``y_t e_t``), goes through the layer rule.
* **conv / linear** — relevant and irrelevant contributions (§3.1, :func:`layer_rule`), bias dropped:
  ``Za1 = f(x⁺; W⁺)``, ``Za2 = f(x⁺; |W⁻|)``, ``D = Za1 + Za2``::

      conv:   C = x⁺⊙f*(W⁺; R⁺/Za1) + x⁺⊙f*(|W⁻|; R⁻/Za2) + x⁺⊙f*(|W⁻|; R/D)
      linear: C = x⁺⊙f*(W⁺; R/Za1)                      + x⁺⊙f*(|W⁻|; R/D)

  (the spec's second and fourth terms ``R⁺/D`` and ``R⁻/D`` are merged; ``/`` is the zero-safe ``sdiv``), followed
  by the uniform shift ``C ← C − (ΣC − ΣR)/N_nz(C) · 1[C≠0]`` (:class:`fxrel.rules.shift.Shifted`). With
  ``negative_inputs=True`` the ``x⁻`` half (``−f(x⁻;W⁺)``, ``f(x⁻;W⁻)`` in the places of ``Za1``, ``Za2``) is added with
  its own shift, as the official code does — ``ΣR`` is then counted twice; it is off by default (after a ReLU it is
  zero anyway).
* **input convolution** (reads the model input) — z^β with each image's min/max, no bias, ``sdiv`` (§3.2).
* **ReLU, BatchNorm** (an unfolded affine; BatchNorm after a conv is folded into it) — identity (§3.3). The
  official BatchNorm rule is the identity up to its ``sdiv`` zeroing units with ``x·γ/σ = 0``; that mask is not
  reproduced, as it would drop relevance at DenseNet's pre-activation BatchNorms (zero input, live output).
* **average pooling** — the z-rule ``R_i = x_i ⊙ sdiv(R, Σ x)`` (§3.3).
* **residual sums** — ``residual="absolute"`` (default): RAP's own absolute-influence split
  ``R_a = |a| / (|a| + |b|) · R``. The official signed z-rule ``R_a = a ⊙ sdiv(R, a + b)`` (``residual="official"``)
  conserves too but amplifies where the operands nearly cancel (a BatchNorm'd branch output against a ReLU'd
  skip): measured on the trained demo ResNet, the last block's ΣR = 5.6 was split into +44.7 (branch) and −39.1
  (skip), compounding block by block into isolated hot pixels (pointing game 0.11 over 36 pairs, against 1.00
  for RSP on the same model).
* **max pooling** — winner-take-all. The official z-rule ``x ⊙ ∇pool(x)ᵀ sdiv(R, pool(x))`` is the same wherever
  ``pool(x) ≠ 0`` and drops ``R`` where the whole window is 0; that happens in DenseNet, whose pre-activation
  BatchNorm shifts zeros into live units, so winner-take-all is used to keep ``ΣR = y_t``.
* **concatenation** — slicing (§3.3); padding and shape ops — their exact VJP.

Forks are sums for every architecture: a value used by several nodes receives the sum of what each sends back (the
builder does this). This is the official Bottleneck behaviour (residual branch + skip after the downsample's rules).
The official BasicBlock ``Clone`` multiplies the positive and negative parts instead (and fails to unpack its
input) — a bug; here BasicBlocks, DenseNet's concatenations and Inception's branches all use the same sum, so
``Σ R = y_t`` holds at every node that all paths pass through, for any architecture (§6.1).
"""
from __future__ import annotations

from typing import Any

import torch

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, kind, last, reads_input
from fxrel.rules.generic import (GenericRule, Group, Term, divide, negative, negative_relevance, positive,
                                 positive_relevance)
from fxrel.rules.gradient import GateAsWeight, Gradient, Pass
from fxrel.rules.lrp import AbsNorm, Norm, ZBox, weights_neg, weights_pos
from fxrel.rules.methods import Method, register, seed_gradient, seed_logit
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


def influence(contributions: Any) -> Any:
    """§2, step 3: ``|C| · ΣC / Σ|C|`` — the magnitudes, rescaled to keep the total."""
    scale = divide(total(contributions), total(contributions.abs()), 0.0)
    return (contributions.abs().flatten(1) * scale).view_as(contributions)


class FirstPropagation(Rule):
    """§2 at the last linear layer, for samples whose relevance has maximum 1 (the official seed ``e_t``); the
    others go through ``general``. With ``Pos = Σ_j R_j(pp_j + nn_j)`` and ``Neg = Σ_j R_j(pn_j + np_j)``::

        C = x ⊙ Wᵀ R                                           (the four sign blocks, each returned by its z-rule)
          + x⁺ ⊙ W⁺ᵀ sdiv(b⊙R · Pos/(Pos+Neg), f(x⁺;W⁺))     (the bias share of the pp block)
          + x⁺ ⊙ W⁻ᵀ sdiv(b⊙R · Neg/(Pos+Neg), f(x⁺;W⁻))     (the bias share of the pn block)
        R_in = |C| · ΣC / Σ|C|

    A block's z-rule ``x^a ⊙ W^bᵀ sdiv(R⊙f(x^a;W^b), f(x^a;W^b))`` returns each contribution ``x_i w_ji`` itself (a
    zero block sum means every term of the block is 0), so the four blocks together are ``x ⊙ Wᵀ R``.
    """

    kinds = frozenset({ops.LINEAR})

    def __init__(self, general: Rule) -> None:
        self.general = general

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        x = ctx.inputs[0]
        contributions = x * ctx.vjp(relevance)[0]
        if ctx.bias is not None:
            contributions = contributions + self._bias_shares(ctx, x, relevance)
        first = influence(contributions).flatten(1)
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
        return f"FirstPropagation(else {self.general!r})"


def rap_composite(first_prop: str = "official", negative_inputs: bool = False, residual: str = "absolute"
                  ) -> Composite:
    """The RAP rule set (see the module docstring)."""
    if first_prop not in ("official", "generic"):
        raise RuleError(f"first_prop must be 'official' or 'generic', got {first_prop!r}")
    if residual not in ("absolute", "official"):
        raise RuleError(f"residual must be 'absolute' or 'official', got {residual!r}")
    add_rule = AbsNorm() if residual == "absolute" else Norm(0.0)
    conv, dense = RAPLayer(False, negative_inputs), RAPLayer(True, negative_inputs)
    pairs = [(reads_input(ops.CONV), ZBox("image", "image", 0.0, ignore_bias=True))]
    if first_prop == "official":
        pairs.append((last(ops.LINEAR), FirstPropagation(dense)))
    pairs += [(kind(ops.CONV), conv), (kind(ops.LINEAR), dense), (kind(ops.ACTIVATION, ops.AFFINE), Pass()),
              (kind(ops.ADD), add_rule), (kind(ops.AVGPOOL, ops.CENTER), Norm(0.0)), (kind(ops.GATE), GateAsWeight()),
              (kind(ops.MAXPOOL, ops.CAT, ops.SHAPE, ops.PAD), Gradient())]
    return Composite(pairs, f"rap[{first_prop}, residual={residual}]")


@register("rap", "relative attributing propagation: absolute-influence first step, relevant/irrelevant split with "
          "uniform shifting in every conv/linear layer, z^β input", "Nam et al. 2020 (RAP)",
          "signed, shaped like the input; Σ R = y_t (the target logit) after every layer",
          first_prop="official", negative_inputs=False, residual="absolute")
def _rap(first_prop: str, negative_inputs: bool, residual: str) -> Method:
    seed = seed_gradient if first_prop == "official" else seed_logit  # official: e_t; AGF/UCAG: y_t·e_t
    return Method("rap", rap_composite(first_prop, negative_inputs, residual), seed)
