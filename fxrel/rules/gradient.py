"""Gradient-family rules: the exact vector–Jacobian product and its modified-ReLU variants."""
from __future__ import annotations

from typing import Any

from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.generic import divide


class Gradient(Rule):
    """Exact vector–Jacobian product: ``R_in = (∂f/∂x)ᵀ R_out``. The engine's correctness reference."""

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return ctx.vjp(relevance)


class Pass(Rule):
    """Pass-through for elementwise nodes: ``R_in = R_out`` (LRP's rule for activations)."""

    kinds = frozenset({ops.ACTIVATION, ops.AFFINE, ops.SHAPE})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        if ctx.kind == ops.SHAPE:
            return ctx.vjp(relevance)
        return [relevance]


class GuidedBackprop(Rule):
    """Guided backpropagation at a ReLU (Springenberg et al. 2015): ``R_in = R_out · [x > 0] · [R_out > 0]``."""

    kinds = frozenset({ops.ACTIVATION})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (grad,) = ctx.vjp(relevance)
        return [grad * (relevance > 0).to(grad.dtype)]


class DeconvNet(Rule):
    """DeconvNet at a ReLU (Zeiler & Fergus 2014): ``R_in = max(R_out, 0)``, ignoring the forward mask."""

    kinds = frozenset({ops.ACTIVATION})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return [relevance.clamp(min=0)]


class GateAsWeight(Rule):
    """A gated feature map ``value ⊙ gate`` with the gate treated as a weight: all the relevance goes to the value
    (the z-rule ``v·g·R / (v·g) = R``) and none into the gate's branch; ``cotangent=True`` (SRD's cotangent form)
    sends ``gate ⊙ S`` instead, so the value keeps ``⟨v, g ⊙ S⟩ = ⟨v ⊙ g, S⟩``."""

    kinds = frozenset({ops.GATE})

    def __init__(self, cotangent: bool = False) -> None:
        self.cotangent = cotangent

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return [ctx.vjp(relevance)[0] if self.cotangent else relevance]


class AttentionAsWeights(Rule):
    """Attention ``z = a v`` with the weights ``a`` as constants (the AH-rule, Ali et al. 2022): the z-rule of the
    linear map ``v ↦ a v``, ``R_v = v ⊙ aᵀ(R / z)`` (zero-safe), which keeps ``Σ R``; none into the weights'
    branch. ``cotangent=True`` (SRD's cotangent form) sends ``aᵀ S``."""

    kinds = frozenset({ops.ATTEND})

    def __init__(self, cotangent: bool = False) -> None:
        self.cotangent = cotangent

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        values, weights = ctx.inputs
        if self.cotangent:
            return [ops.unbroadcast(weights.transpose(-2, -1) @ relevance, ctx.node, 0)]
        return [ops.unbroadcast(values * (weights.transpose(-2, -1) @ divide(relevance, ctx.output, 0.0)), ctx.node, 0)]
