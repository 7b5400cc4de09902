"""Streams that carry several relevance tensors per sample, folded into the batch axis.

A stream seeded with ``copies`` rows per sample — row ``k·N + n`` for copy ``k`` of sample ``n`` (``N`` samples) —
runs through ordinary rules if every node's inputs and output are repeated the same way. :class:`Repeated` does
that for any rule, so ``Repeated(Gradient(), K)`` seeded with one one-hot row per class computes the gradient of
every class score at once: the Jacobian that RSP's relative gradient activation map needs (rsp.md §2).
"""
from __future__ import annotations

from typing import Any

from fxrel.errors import UnsupportedOpError
from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext


def _repeat(value: Any, node: Any, copies: int) -> Any:
    rank = len(node.meta["tensor_meta"].shape)
    return value.repeat(copies, *[1] * (rank - 1))


def _repeated(ctx: RuleContext, copies: int) -> RuleContext:
    """The context with the node's inputs and output repeated ``copies`` times along the batch axis."""
    return ctx.replace(inputs=[_repeat(x, a, copies) for x, a in zip(ctx.inputs, ops.tensor_inputs(ctx.node))],
                       output=_repeat(ctx.output, ctx.node, copies))


class Repeated(Rule):
    """``rule`` on a stream with ``copies`` relevance tensors per sample (rows ``k·N + n``)."""

    def __init__(self, rule: Rule, copies: int) -> None:
        self.rule = rule
        self.copies = copies
        self.kinds = rule.kinds

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        batch = ctx.node.meta.get("fxrel_batch_axis")
        if self.copies > 1 and batch is not None and not batch.first:
            raise UnsupportedOpError(
                f"this method folds {self.copies} relevance rows per sample into the batch axis, and node "
                f"'{ctx.node.name}' (module '{ctx.node.meta.get('fxrel_module', '')}') has the batch at axis "
                f"{batch.axis}{' folded with other axes' if batch.inner * batch.outer > 1 else ''} "
                "(transformer attention moves it)")
        return self.rule(_repeated(ctx, self.copies) if self.copies > 1 else ctx, relevance)

    def __repr__(self) -> str:
        return f"Repeated({self.rule!r}, copies={self.copies})"
