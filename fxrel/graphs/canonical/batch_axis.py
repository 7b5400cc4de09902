"""Where the batch axis is at every node of a canonical graph (``node.meta['fxrel_batch_axis']``), and the check that
no op mixes the samples of a batch.

Transformers move the batch axis: timm's attention permutes ``qkv`` to ``[3, N, heads, tokens, d]`` before
unbinding it, torch's ``MultiheadAttention`` runs sequence-first (``[tokens, N, d]``) and folds the heads into the
batch (``[tokens, N·heads, d]``). The pass follows the batch through every op as a :class:`BatchAxis` — the axis
that holds it and the size of what is folded inside it — and raises :class:`UnsupportedOpError`, naming the node
and its source line, where an op would mix samples: a slice, concatenation, reduction, normalisation or softmax
along the batch, a convolution or pooling with the batch off axis 0, a linear layer over it. With batch size 1
nothing can mix, and nothing is refused.

``gm.meta['fxrel_batch_first']`` records whether the batch is axis 0, unfolded, at every node: what rules that fold
several relevance rows per sample into axis 0 (:class:`fxrel.rules.batched.Repeated`) need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx

from fxrel.errors import UnsupportedOpError
from fxrel.graphs import ops
from fxrel.graphs.analysis import node_shape
from fxrel.graphs.ops import aten

__all__ = ["BatchAxis", "mark_batch_axis"]


@dataclass(frozen=True)
class BatchAxis:
    """The batch is axis ``axis``, with ``inner`` entries of other axes folded inside it (heads folded into the
    batch: ``inner = heads``) and ``outer`` outside it; ``axis=0, inner=outer=1`` is batch-first."""

    axis: int
    inner: int = 1
    outer: int = 1

    @property
    def first(self) -> bool:
        return self.axis == 0 and self.inner == 1 and self.outer == 1


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.clone.default,
             aten.alias.default)
#: ops that work on axes ≥ 1 of a batch-first tensor
_BATCH_FIRST = (aten.convolution.default, aten.max_pool2d.default, aten.avg_pool2d.default,
                aten.adaptive_avg_pool2d.default, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
                aten.upsample_bicubic2d.vec, aten.im2col.default, aten.col2im.default,
                aten.pad.default)


def _reshaped(batch: BatchAxis, before: tuple[int, ...], after: tuple[int, ...], size: int) -> BatchAxis | None:
    """The batch after a reshape from ``before`` to ``after`` (contiguous layouts), or None when it is split over
    several axes."""
    stride = batch.inner * math.prod(before[batch.axis + 1:])   # flat distance between two samples
    for k, length in enumerate(after):
        step = math.prod(after[k + 1:])
        if step <= stride and stride % step == 0 and stride * size <= step * length and (step * length) % (
                stride * size) == 0:
            inner = stride // step
            return BatchAxis(k, inner, length // (inner * size))
    return None


def _aligned(batch: BatchAxis, node: fx.Node, source: fx.Node) -> BatchAxis:
    """``batch`` of a broadcast operand, as an axis of ``node``'s output (ranks aligned from the right)."""
    return BatchAxis(batch.axis + len(node_shape(node)) - len(node_shape(source)), batch.inner, batch.outer)


def _reduced(dims, rank: int) -> list[int]:
    return sorted({d % rank for d in dims})


class _Tracker:
    def __init__(self, gm: fx.GraphModule) -> None:
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.size = node_shape(inputs[0])[0] if inputs else 1

    def refuse(self, node: fx.Node, why: str) -> None:
        if self.size > 1:
            raise UnsupportedOpError(
                f"node '{node.name}' (target {node.meta.get('fxrel_origin', node.target)}, module "
                f"'{node.meta.get('fxrel_module', '')}') would mix the samples of a batch: {why}\n"
                f"  source: {node.meta.get('fxrel_source', '<unknown>')}")

    def along(self, node: fx.Node, batch: BatchAxis, dims, what: str) -> None:
        if batch.axis in _reduced(dims, len(node_shape(node.args[0]))):
            self.refuse(node, f"{what} along dim {batch.axis}, the batch axis")

    def reduced(self, node: fx.Node, batch: BatchAxis, dims, keepdim: bool, what: str) -> BatchAxis:
        """The batch after a reduction over ``dims`` (refused along the batch): shifted by the dims dropped before
        it."""
        self.along(node, batch, dims, what)
        dropped = 0 if keepdim else sum(d < batch.axis for d in _reduced(dims, len(node_shape(node.args[0]))))
        return BatchAxis(batch.axis - dropped, batch.inner, batch.outer)

    def axis(self, node: fx.Node) -> BatchAxis | None:
        inputs = [a for a in ops.tensor_inputs(node) if a.meta.get("fxrel_batch_axis") is not None]
        if not inputs:
            return None
        source = inputs[0]
        t, rank = node.target, len(node_shape(node))
        batch = _aligned(source.meta["fxrel_batch_axis"], node, source) if len(node_shape(node)) >= len(
            node_shape(source)) and t not in _BATCH_FIRST else source.meta["fxrel_batch_axis"]  # F.fold adds a dim
        if t in _RESHAPES:
            moved = _reshaped(source.meta["fxrel_batch_axis"], node_shape(source), node_shape(node), self.size)
            if moved is None:
                self.refuse(node, f"the reshape {node_shape(source)} → {node_shape(node)} splits the batch over "
                                  "several axes")
                return BatchAxis(0)
            return moved
        if t is aten.permute.default:
            order = [d % rank for d in node.args[1]]
            return BatchAxis(order.index(batch.axis), batch.inner, batch.outer)
        if t is aten.transpose.int:
            d0, d1 = node.args[1] % rank, node.args[2] % rank
            swap = {d0: d1, d1: d0}
            return BatchAxis(swap.get(batch.axis, batch.axis), batch.inner, batch.outer)
        if t is aten.slice.Tensor:
            dim, start, end = node.args[1] % rank, node.args[2], node.args[3]
            step = node.args[4] if len(node.args) > 4 else 1
            if dim == batch.axis and not (start == 0 and end >= node_shape(source)[dim] and step == 1):
                self.refuse(node, f"a slice along dim {dim}, the batch axis")
            return batch
        if t is aten.index_select.default:
            self.along(node, batch, [node.args[1]], "an index_select")
            return batch
        if t in (aten.roll.default, aten.flip.default):
            self.along(node, batch, node.args[-1], "a roll or flip")
            return batch
        if t is aten.expand.default:
            before = node_shape(source)
            self.along(node, batch, [d for d, n in enumerate(node.args[1]) if before[d] == 1 and n not in (-1, 1)],
                       "an expand")
            return batch
        if t is aten.unfold.default:   # the windows become a new last dim: the batch keeps its axis
            batch = source.meta["fxrel_batch_axis"]
            self.along(node, batch, [node.args[1]], "sliding windows")
            return batch
        if t is aten.repeat_interleave.self_int:
            self.along(node, batch, [node.args[2]], "a repeat_interleave")
            return batch
        if t is aten.cat.default or t is ops.with_tokens:
            dim = (node.args[1] if t is aten.cat.default else node.args[3]) % rank
            axes = {a.meta["fxrel_batch_axis"] for a in inputs}
            if dim == batch.axis or len(axes) > 1:
                self.refuse(node, f"a concatenation along dim {dim} of tensors with the batch at "
                                  f"{sorted(axes, key=repr)}")
            return batch
        if t is aten.mean.dim:
            return self.reduced(node, batch, node.args[1], ops.argument(node, "keepdim", False), "a mean")
        if t in (ops.center, ops.inv_std, ops.response_scale, ops.inv_sum):
            self.along(node, batch, node.args[1], "a normalisation")
            return batch
        if t is aten.amax.default:
            return self.reduced(node, batch, node.args[1], node.args[2] if len(node.args) > 2 else False,
                                "a maximum")
        if t is aten.softmax.int:
            self.along(node, batch, [node.args[1]], "a softmax")
            return batch
        if t in (ops.attention_weights, ops.attend) and batch.axis >= rank - 2:
            self.refuse(node, "attention over the batch axis")
        if t is aten.linear.default and batch.axis == rank - 1:
            self.refuse(node, "a linear layer over the batch axis")
        if t in _BATCH_FIRST and not batch.first:
            self.refuse(node, f"{t} needs the batch on axis 0, here it is axis {batch.axis}")
        if t is aten.constant_pad_nd.default:
            padded = [rank - 1 - i // 2 for i, p in enumerate(node.args[1]) if p]
            if batch.axis in padded:
                self.refuse(node, f"padding along dim {batch.axis}, the batch axis")
        return batch


def mark_batch_axis(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate every tensor node with its :class:`BatchAxis` (``None`` for constants) and the graph with
    ``fxrel_batch_first``; raise where an op would mix samples (see the module docstring). Needs ``tensor_meta``."""
    tracker = _Tracker(gm)
    first = True
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["fxrel_batch_axis"] = BatchAxis(0)
        elif node.op == "call_function":
            batch = tracker.axis(node)
            node.meta["fxrel_batch_axis"] = batch
            first = first and (batch is None or batch.first)
    gm.meta["fxrel_batch_first"] = first
    return gm
