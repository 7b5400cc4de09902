"""RSP's rules below the relative map's layer X: sectional propagation (Nam, Choi, Lee, AAAI 2021, Eq. 3–5;
``specs/rsp.md`` §3).

For a convolution with input ``x`` (only ``x⁺`` is used) and relevance ``R`` at its output, the positive and
negative sections ``P = R⁺``, ``N = (−R)⁺`` with masks ``B^± = 1[±R > 0]``::

    ν^± = ∂/∂W ⟨P|N, f(x⁺; W) ⊙ B^±⟩                     Eq. 3: per-sample weight VJPs (ctx.weight_vjp), ν^± ≥ 0
    R̂  = x⁺ ⊙ f*(ν⁺; P / f(x⁺; ν⁺)) − x⁺ ⊙ f*(ν⁻; N / f(x⁺; ν⁻))     Eq. 4: the z-rule with ν as the weights
    R̈  = 2 R̂ − (ΣR / N_nz(R̂)) · 1[R̂ ≠ 0]                Eq. 5, only for kernels larger than 1×1 (the code's test)

(``/`` is the zero-safe ``sdiv``; the masks ``B^±`` are implied: ``P`` vanishes outside ``B⁺``; ``S = ΣR`` and the
count ``N_nz`` of non-zero ``R̂`` follow the code — the paper's Γ counts active ``x``). Eq. 4 is the generic
rule (:mod:`fxrel.rules.generic`) with one group per section and per-sample weights; Eq. 5 is the shared uniform
shift (:mod:`fxrel.rules.shift`). ``ν`` depends on ``x``, ``R`` and the conv's geometry, never on its weights.

Other nodes (rsp.md §3.2–3.3): the input convolution gets z^β with each image's min/max (no bias, ``sdiv``);
ReLU and BatchNorm the identity (without the official code's zero mask at ``x·γ/σ = 0``, see
:mod:`fxrel.catalog.rap`); residual sums ``R_a = (a⁺ + ε)/(a⁺ + b⁺ + 2ε) · R``; average pooling the z-rule on
``x + ε`` (``ε = 10⁻⁹``); max pooling winner-take-all (what the official z-rule on ``x + ε`` amounts to);
concatenation slicing; forks a sum (the official BasicBlock ``Clone`` multiplies instead — a bug). Nodes above X
are never reached; a node below X with no sectional rule (a linear layer) is an error.
"""
from __future__ import annotations

from typing import Any

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, kind, reads_input, where
from fxrel.rules.generic import (
    GenericRule,
    Group,
    Term,
    dtype_of,
    negative_relevance,
    positive,
    positive_relevance,
    stabilizer_for,
)
from fxrel.rules.gradient import Pass
from fxrel.rules.lrp import ZBox
from fxrel.rules.shift import Shifted

#: the official code's ε in the pooling and sum rules (raised to ``finfo(dtype).tiny`` in float16, where 1e-9
#: rounds to 0: :func:`fxrel.rules.generic.stabilizer_for`)
TINY = 1e-9


def _sectional_weights(ctx: RuleContext, inputs: list, section: Any) -> Any:
    """Eq. 3: ``ν = (∂f(x⁺; W)/∂W)ᵀ |section|`` per sample."""
    return ctx.weight_vjp(section.abs(), inputs)


_SECTION = Term(positive, tag="nu", weights=_sectional_weights)


def sectional_rule() -> GenericRule:
    """Eq. 3–4: one group per section, each with its own sectional weights."""
    groups = (Group((_SECTION,), relevance=positive_relevance), Group((_SECTION,), relevance=negative_relevance))
    rule = GenericRule(groups, 0.0, "Sectional(Eq. 3-4)")
    rule.kinds = frozenset({ops.CONV})
    return rule


def _tiny(ctx: RuleContext) -> float:
    return stabilizer_for(TINY, dtype_of(ctx.node))


def _plus_tiny(x: Any, ctx: RuleContext) -> Any:
    return x + _tiny(ctx)


def _positive_plus_tiny(x: Any, ctx: RuleContext) -> Any:
    return x.clamp(min=0) + _tiny(ctx)


def _pointwise(node: Any) -> bool:
    """A 1×1 (pointwise) convolution: RSP skips the shift there (the code tests ``kernel_height == 1``)."""
    return node.meta.get("fxrel_kind") == ops.CONV and ops.conv_geometry(node).pointwise


class NotDecomposed(Rule):
    """Nodes a stream entering at X never reaches (above X); reaching one below X is an error."""

    def __init__(self, method: str = "RSP") -> None:
        self.method = method

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        raise RuleError(f"{self.method} has no rule for node '{ctx.node.name}' of kind '{ctx.kind}' (module "
                        f"'{ctx.node.meta.get('fxrel_module', '')}') below its start layer X; X must lie above every "
                        "linear layer")


def sectional_composite() -> Composite:
    """RSP's rule set below X (see the module docstring)."""
    section = sectional_rule()
    return Composite([
        (reads_input(ops.CONV), ZBox("image", "image", 0.0, ignore_bias=True)),
        (where(_pointwise), section),
        (kind(ops.CONV), Shifted(section, doubling=True)),
        (kind(ops.ACTIVATION, ops.AFFINE), Pass()),
        (kind(ops.ADD), GenericRule((Group((Term(_positive_plus_tiny),)),), 0.0, "PositiveSplit(eps=1e-9)")),
        (kind(ops.AVGPOOL, ops.CENTER), GenericRule((Group((Term(_plus_tiny),)),), 0.0, "Norm(x+1e-9)")),
    ], "rsp[sectional]", default=NotDecomposed())
