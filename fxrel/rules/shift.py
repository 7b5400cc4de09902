"""Uniform shifting: spread an excess of relevance evenly over the units that carry relevance, and subtract it.

One operation, used by three methods (sums ``Σ`` run over all non-batch axes, per sample)::

    shift(V, E, U) = V − (E / N_nz(U)) · 1[U ≠ 0]          N_nz(U) = number of non-zero entries of U

* AGF's Δ-shift (Gur et al. 2021, Def. 2): ``Φ = shift(C + r, Σ r, C)`` keeps ``Σ Φ = Σ C``;
* RAP's ``shift_rel`` after every conv/linear rule (rap.md §3.1): ``shift(C, Σ C − Σ R_out, C)``, so that
  ``Σ R_in = Σ R_out``; units with little relevance turn negative ("irrelevant = negative");
* RSP's doubling and shifting, Eq. 5 (rsp.md §3.1): ``R̈ = shift(2 R̂, S, R̂)`` with ``S = Σ R_out``.

:func:`uniform_shift` is the operation; :class:`Shifted` applies it after a layer rule (RAP, RSP). A sample whose
``U`` has no non-zero entry is left unshifted.
"""
from __future__ import annotations

from typing import Any

from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.generic import divide


def total(t: Any) -> Any:
    """``Σ t`` per sample, shaped ``[N, 1]``."""
    return t.flatten(1).sum(1, keepdim=True)


def uniform_shift(values: Any, excess: Any, support: Any) -> Any:
    """``values − (excess / N_nz(support)) · 1[support ≠ 0]``; ``excess`` per sample, shaped ``[N, 1]``."""
    carriers = (support != 0).to(values.dtype).flatten(1)
    step = divide(excess, carriers.sum(1, keepdim=True), 0.0)
    return (values.flatten(1) - step * carriers).view_as(values)


class Shifted(Rule):
    """A single-input layer rule ``R̂ = rule(ctx, R_out)`` followed by uniform shifting.

    ``doubling=False`` (RAP): ``R_in = shift(R̂, Σ R̂ − Σ R_out, R̂)``, so ``Σ R_in = Σ R_out`` exactly.
    ``doubling=True`` (RSP, Eq. 5): ``R_in = shift(2 R̂, Σ R_out, R̂)``; ``Σ R_in = Σ R_out`` when ``R̂`` conserves.
    """

    def __init__(self, rule: Rule, doubling: bool = False) -> None:
        self.rule = rule
        self.doubling = doubling
        self.kinds = rule.kinds

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (hat,) = self.rule(ctx, relevance)
        if self.doubling:
            return [uniform_shift(2 * hat, total(relevance), hat)]
        return [uniform_shift(hat, total(hat) - total(relevance), hat)]

    def __repr__(self) -> str:
        return f"Shifted({self.rule!r}{', doubling=True' if self.doubling else ''})"
