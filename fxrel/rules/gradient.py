"""Gradient-family rules: the exact vector–Jacobian product and its modified-ReLU variants."""
from __future__ import annotations

from typing import Any

from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext


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
