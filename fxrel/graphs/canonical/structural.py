"""Handlers that move values without arithmetic: ops kept as they are (activations, shape ops, pooling, ``cat``),
``getitem``, slicing (``slice``/``split``/``unbind``), ``stack``, padding, upsampling, and the no-ops that are dropped
(dtype casts, eval-mode dropout, detaches, asserts)."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.normalisers import _reshaped
from fxrel.graphs.canonical.registry import handles
from fxrel.graphs.canonical.walker import _Canonicalizer
from fxrel.graphs.ops import aten


@handles(operator.getitem)
def _getitem(c: _Canonicalizer, n: fx.Node):
    container, index = n.args
    value = c.value(container)
    if isinstance(value, (tuple, list)) and index < len(value):
        return value[index]
    raise c.unsupported("getitem of an unsupported multi-output op")


@handles(*ops.ACTIVATIONS, *ops.SHAPE_OPS, aten.max_pool2d.default, aten.avg_pool2d.default,
         aten.adaptive_avg_pool2d.default, aten.cat.default)
def _passthrough(c: _Canonicalizer, n: fx.Node):
    if n.target in ops.SHAPE_OPS and c.pending(n.args[0]) is not None:   # a statistic reshaped for a division
        return _reshaped(c, n)
    target = aten.view.default if n.target is aten._unsafe_view.default else n.target
    args = tuple([c.value(a) for a in n.args[0]] if i == 0 and isinstance(n.args[0], (list, tuple)) else c.value(a)
                 for i, a in enumerate(n.args))
    return c.emit(target, args, dict(n.kwargs))


def _slice_node(c: _Canonicalizer, x: fx.Node, dim: int, start: int, end: int) -> fx.Node:
    if dim == 0:
        raise c.unsupported("slicing along the batch axis")
    return c.emit(aten.slice.Tensor, (c.value(x), dim, start, end, 1))


@handles(aten.slice.Tensor)
def _slice(c: _Canonicalizer, n: fx.Node):
    """``x[..., start:end]`` along one dim, step 1 (bounds normalised to ``0 ≤ start ≤ end ≤ size``)."""
    x, dim, start, end, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1:])[:5]
    shape = x.meta["val"].shape
    dim %= len(shape)
    size = shape[dim]
    if step != 1:
        raise c.unsupported(f"slice with step {step} (only step 1 is canonical)")

    def bound(v: int | None, default: int) -> int:
        v = default if v is None else v
        return min(max(v + size if v < 0 else v, 0), size)

    start = bound(start, 0)
    return _slice_node(c, x, dim, start, max(bound(end, size), start))


@handles(aten.split.Tensor, aten.split_with_sizes.default)
def _split(c: _Canonicalizer, n: fx.Node):
    """``split``/``chunk``: one canonical slice per piece (``getitem`` then picks them)."""
    x, sizes = n.args[0], n.args[1]
    dim = ops.argument(n, "dim", 0)
    shape = x.meta["val"].shape
    dim %= len(shape)
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[dim] - s) for s in range(0, shape[dim], sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(_slice_node(c, x, dim, s, s + k) for s, k in zip(starts, sizes))


@handles(aten.unbind.int)
def _unbind(c: _Canonicalizer, n: fx.Node):
    """``unbind``: one squeezed canonical slice per index (``getitem`` picks them; attention's q, k, v)."""
    x = n.args[0]
    dim = ops.argument(n, "dim", 0) % len(x.meta["val"].shape)
    return tuple(c.emit(aten.squeeze.dim, (_slice_node(c, x, dim, i, i + 1), dim))
                 for i in range(x.meta["val"].shape[dim]))


@handles(aten.stack.default)
def _stack(c: _Canonicalizer, n: fx.Node):
    """``stack`` = ``unsqueeze`` of each tensor, then ``cat`` (SKNet's branches)."""
    tensors = n.args[0]
    dim = ops.argument(n, "dim", 0) % (len(tensors[0].meta["val"].shape) + 1)
    if dim == 0:
        raise c.unsupported("stacking along the batch axis")
    return c.emit(aten.cat.default, ([c.emit(aten.unsqueeze.default, (c.value(t), dim)) for t in tensors], dim))


@handles(aten.pad.default, aten.constant_pad_nd.default)
def _pad(c: _Canonicalizer, n: fx.Node):
    mode = ops.argument(n, "mode", "constant")
    value = ops.argument(n, "value", 0.0)
    if n.target is aten.constant_pad_nd.default:
        mode, value = "constant", (n.args[2] if len(n.args) > 2 else 0.0)
    pads = list(n.args[1])
    if mode in ("reflect", "replicate") and len(pads) == 4 and all(p >= 0 for p in pads):
        return c.emit(aten.pad.default, (c.value(n.args[0]), pads, mode))   # blur pools: a linear resampling
    value = float(value or 0.0)
    pooled = bool(n.users) and all(u.target in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
                                   for u in n.users)
    if mode != "constant" or not (value == 0.0 or (value == -math.inf and pooled)):
        raise c.unsupported(f"padding mode={mode} value={value} (zero padding or cropping, −∞ padding before "
                            "max-pooling (TF 'SAME') and 2-D reflect/replicate padding are canonical)")
    return c.emit(aten.constant_pad_nd.default, (c.value(n.args[0]), pads, value))


@handles(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)
def _upsample(c: _Canonicalizer, n: fx.Node):
    return c.emit(n.target, (c.value(n.args[0]), *n.args[1:]))


@handles(aten._to_copy.default)
def _to_copy(c: _Canonicalizer, n: fx.Node):
    """A floating-point dtype cast (EvoNorm's float32 statistics): the canonical graph keeps the input's dtype."""
    dtype = n.kwargs.get("dtype")
    if set(n.kwargs) - {"dtype", "layout", "device", "memory_format"} or (dtype is not None
                                                                          and not dtype.is_floating_point):
        raise c.unsupported(f"copy with {n.kwargs} (only floating-point dtype casts are canonical)")
    return c.pending(n.args[0]) or c.value(n.args[0])


@handles(aten.dropout.default, aten.detach.default, aten.lift_fresh_copy.default)
def _identity(c: _Canonicalizer, n: fx.Node):
    if n.target is aten.dropout.default and n.args[2]:
        raise c.unsupported("dropout in training mode")
    return c.value(n.args[0])


@handles(torch._assert, aten._assert_async.msg, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
         aten._assert_tensor_metadata.default)
def _drop(c: _Canonicalizer, n: fx.Node):
    return None
