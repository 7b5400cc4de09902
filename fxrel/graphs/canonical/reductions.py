"""Handlers for reductions: means over non-batch axes (average pooling, a mean over tokens) and sums, which are a
mean times a count or a sum of slices; a mean inside a normaliser's statistic is left to
:mod:`~fxrel.graphs.canonical.normalisers`' pattern."""
from __future__ import annotations

import math

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.pending import _Pending
from fxrel.graphs.canonical.registry import handles
from fxrel.graphs.canonical.structural import _passthrough
from fxrel.graphs.canonical.walker import _Canonicalizer
from fxrel.graphs.ops import aten


def _sum_as_mean(c: _Canonicalizer, x: fx.Node, dims: list[int], keepdim: bool, count: int,
                 dtype: torch.dtype) -> fx.Node:
    """A sum over ``dims`` as their mean (a canonical average pooling or mean over tokens) times their size
    ``count``; a sum along the batch is refused by ``mark_batch_axis``, as a mean is."""
    mean = c.emit(aten.mean.dim, (x, dims, keepdim))
    return c.emit(ops.channel_affine, (mean, c.param(torch.tensor(float(count), dtype=dtype), "scale"), None))


@handles(aten.sum.dim_IntList)
def _sum(c: _Canonicalizer, n: fx.Node):
    """A sum over spatial axes, or over longer non-batch axes (SwiftFormer's sum over tokens), is a mean times their
    size; over one short non-batch axis (≤ 16 entries: SKNet's branch axis), the sum of its slices."""
    x, dims = n.args[0], n.args[1]
    keepdim = ops.argument(n, "keepdim", False)
    shape = x.meta["val"].shape
    dims = sorted({d % len(shape) for d in (dims or range(len(shape)))})
    if n.kwargs.get("dtype") is not None:
        raise c.unsupported("sum with a dtype conversion")
    if ops.is_spatial_mean(dims, len(shape)) or len(dims) != 1 or shape[dims[0]] > 16:
        return _sum_as_mean(c, c.value(x), dims, keepdim, math.prod(shape[d] for d in dims), x.meta["val"].dtype)
    dim = dims[0]
    parts = [c.emit(aten.slice.Tensor, (c.value(x), dim, i, i + 1, 1)) for i in range(shape[dim])]
    if not keepdim:
        parts = [c.emit(aten.squeeze.dim, (p, dim)) for p in parts]
    total = parts[0]
    for part in parts[1:]:
        total = c.emit(aten.add.Tensor, (total, part))
    return total


@handles(aten.mean.dim)
def _mean(c: _Canonicalizer, n: fx.Node):
    rank = len(n.args[0].meta["val"].shape)
    pending = c.pending(n.args[0])
    if pending is not None and pending.norm:
        keepdim = ops.argument(n, "keepdim", False)
        if not keepdim:
            raise c.unsupported("mean of a norm without keepdim")
        return _Pending(pending.x, pending.dims, norm=True, channel_dims=tuple(d % rank for d in n.args[1]))
    if pending is not None and pending.squared:
        keepdim = ops.argument(n, "keepdim", False)
        if not keepdim:
            raise c.unsupported("mean of squares without keepdim (only rsqrt(mean(x², keepdim=True) + ε) is canonical)")
        return _Pending(pending.x, tuple(d % rank for d in n.args[1]))
    return _passthrough(c, n)   # a mean along the batch is refused by mark_batch_axis
