"""AttnLRP's rules for products of two computed tensors and for softmax (Achtibat et al., ICML 2024).

* **Uniform ε-rule** (Prop. 3.3) for a product ``z = a b`` of two computed tensors (attention ``A V``, logits
  ``q kᵀ``, elementwise products): each factor takes half of the ε-relevance,
  ``R_a = a ⊙ ((R / stab(2z)) bᵀ)``, ``R_b = b ⊙ (aᵀ (R / stab(2z)))``, so ``ΣR_a + ΣR_b = ΣR`` up to ε.
* **Softmax by its Taylor decomposition at x** (Prop. 3.1): ``R_x = x ⊙ (R − s · Σ_j R_j)`` for ``s = softmax(x)``
  over the last axis (``x = −∞``, a mask, counts as 0, as LXT does).
* **Attention weights** ``A = softmax(s · q kᵀ + b)`` (the fused canonical node): the softmax rule, the constant
  bias ``b`` taking its ε-share of ``R_x`` (the z-rule of the sum), and the uniform rule on ``q kᵀ``. The shares
  cancel the divisions: with ``G = R − A ⊙ Σ_j R_j``, ``R_q = ½ s · q ⊙ (G k)``, ``R_k = ½ s · k ⊙ (Gᵀ q)`` — the ε of
  the chain's denominators ``s q kᵀ`` drops out (LXT keeps it: it differs from this by ``ε / |q kᵀ|`` relative).

CP-LRP (Ali et al. 2022) keeps attention weights constant instead (:class:`fxrel.rules.gradient.AttentionAsWeights`,
the structural default); the methods' ``attention`` parameter selects between the two
(:func:`fxrel.rules.composite.attention_pairs`).
"""
from __future__ import annotations

from typing import Any

import torch

from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.generic import divide, dtype_of

__all__ = ["UniformProduct", "SoftmaxTaylor", "AttentionWeightsTaylor"]


class UniformProduct(Rule):
    """The uniform ε-rule of a product of two computed tensors (``bilinear`` ``a @ b``, ``product`` ``a ⊙ b``,
    ``attend`` ``A @ V``, ``gated_unit`` ``v ⊙ act(g)``): each factor times the product's VJP of the shared relevance,
    ``R_x = x ⊙ (∂z/∂x)ᵀ (R / stab(2z))`` — for a product linear in each factor this is half of its ε-relevance
    (``x ⊙ (∂z/∂x)ᵀ`` of a broadcast factor sums over the dims it was broadcast along)."""

    kinds = frozenset({ops.BILINEAR, ops.ATTEND, ops.GATE})   # GATE: gated linear units (``ops.gated_unit``)

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        share = divide(relevance, ctx.output * 2, self.epsilon, dtype_of(ctx.node))
        return [x * g for x, g in zip(ctx.inputs, ctx.vjp(share))]


def _spread(relevance: Any, weights: Any) -> Any:
    """``G = R − s ⊙ Σ_j R_j`` over the last axis."""
    return relevance - weights * relevance.sum(-1, keepdim=True)


class SoftmaxTaylor(Rule):
    """Softmax over the last axis by its Taylor decomposition at x: ``R_x = x ⊙ (R − s Σ R)``."""

    kinds = frozenset({ops.STAT})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (x,) = ctx.inputs
        finite = torch.where(torch.isneginf(x), 0.0, x)
        return [finite * _spread(relevance, ctx.output)]


class AttentionWeightsTaylor(Rule):
    """``attention_weights(q, k, s, b)``: softmax Taylor rule, bias share, uniform rule on ``q kᵀ`` (module
    docstring): ``R_q = ½ s · q ⊙ (G k)``, ``R_k = ½ s · k ⊙ (Gᵀ q)``."""

    kinds = frozenset({ops.STAT})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        q, k = ctx.inputs
        spread = _spread(relevance, ctx.output) * (0.5 * ctx.node.args[2])
        return [ops.unbroadcast(q * (spread @ k), ctx.node, 0),
                ops.unbroadcast(k * (spread.transpose(-2, -1) @ q), ctx.node, 1)]
