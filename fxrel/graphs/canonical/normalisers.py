"""The normaliser pattern recogniser: hand-written statistics (timm's RmsNorm2d and SimpleNorm's
``rsqrt(mean(x²) + ε)`` / ``rsqrt(var(x) + ε)``, EvoNorm's ``value / sqrt(var(x_g) + ε)``, ConvNeXt-V2's
``‖x‖ / (mean_c ‖x‖ + ε)``, F.normalize's ``x / max(‖x‖, ε)``) are walked as
:class:`~fxrel.graphs.canonical.pending._Pending` values, emitting nothing, until ``rsqrt`` or the division closes
them as one ``inv_std`` / ``response_scale`` / ``inv_norm`` statistic. The ``mean`` and ``+ ε`` steps are
recognised by :mod:`~fxrel.graphs.canonical.reductions` and :mod:`~fxrel.graphs.canonical.arithmetic`."""
from __future__ import annotations

from dataclasses import replace

from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.pending import _Pending
from fxrel.graphs.canonical.registry import handles
from fxrel.graphs.canonical.walker import _Canonicalizer
from fxrel.graphs.ops import aten


@handles(aten.pow.Tensor_Scalar)
def _pow(c: _Canonicalizer, n: fx.Node):
    if n.args[1] != 2:
        raise c.unsupported(f"power {n.args[1]} (only the square inside a normaliser's rsqrt(mean(x²) + ε) is "
                            "canonical)")
    c.value(n.args[0])
    return _Pending(n.args[0], squared=True)


@handles(aten.square.default)
def _square(c: _Canonicalizer, n: fx.Node):
    """``x.square()`` (StarReLU in MetaFormer heads): the elementwise ``x²``, as ``x ** 2`` outside a statistic."""
    return c.emit(aten.pow.Tensor_Scalar, (c.value(n.args[0]), 2))


@handles(aten.var.dim, aten.var.correction)
def _var(c: _Canonicalizer, n: fx.Node):
    x, dims = n.args[0], n.args[1]
    if n.target is aten.var.dim:
        correction = int(ops.argument(n, "unbiased", True))
        keepdim = ops.argument(n, "keepdim", False)
    else:
        correction, keepdim = n.kwargs.get("correction", 1), n.kwargs.get("keepdim", False)
    if not keepdim or dims is None:
        raise c.unsupported("variance without keepdim (only rsqrt(var(x, dims, keepdim=True) + ε) is canonical)")
    c.value(x)
    rank = len(x.meta["val"].shape)
    return _Pending(x, tuple(d % rank for d in dims), correction=int(correction))


@handles(aten.linalg_vector_norm.default)
def _vector_norm(c: _Canonicalizer, n: fx.Node):
    x, order, dims = (list(n.args) + [2, None][len(n.args) - 1:])[:3]
    keepdim = ops.argument(n, "keepdim", False)
    if order != 2 or dims is None or not keepdim:
        raise c.unsupported("vector norm other than ‖x‖₂ over given dims with keepdim (GlobalResponseNorm's)")
    c.value(x)
    rank = len(x.meta["val"].shape)
    return _Pending(x, tuple(d % rank for d in dims), norm=True)


def _response_scale(c: _Canonicalizer, numerator: _Pending, denominator: _Pending):
    """``‖x‖ / (mean_c ‖x‖ + ε)``: the division that closes a GRN statistic."""
    if not (numerator.norm and not numerator.channel_dims and denominator.channel_dims
            and denominator.x is numerator.x and denominator.dims == numerator.dims):
        raise c.unsupported("division of statistics other than GlobalResponseNorm's ‖x‖ / (mean_c ‖x‖ + ε)")
    return c.emit(ops.response_scale, (c.value(numerator.x), list(numerator.dims), list(denominator.channel_dims),
                                       denominator.eps))


def _reshaped(c: _Canonicalizer, n: fx.Node) -> _Pending:
    return replace(c.pending(n.args[0]), view=tuple(n.meta["val"].shape))


@handles(aten.sqrt.default)
def _sqrt(c: _Canonicalizer, n: fx.Node):
    pending = c.pending(n.args[0])
    if pending is None or pending.squared or pending.norm or pending.root:
        raise c.unsupported("sqrt of something other than a normaliser's var(x) + ε or mean(x²) + ε")
    return replace(pending, root=True)


def _divided_by_std(c: _Canonicalizer, value: fx.Node, std: _Pending) -> fx.Node:
    """``value / sqrt(var(x_g) + ε)`` with ``x_g`` the groups of a tensor shaped like ``value`` (EvoNorm-S0's
    ``group_std``): ``value`` viewed in those groups, gated by the group's 1/σ, viewed back."""
    grouped, shape = std.x.meta["val"].shape, value.meta["val"].shape
    if std.view != tuple(shape) or grouped.numel() != shape.numel():
        raise c.unsupported(f"division by a standard deviation shaped {std.view} over groups shaped "
                            f"{tuple(grouped)} of a tensor shaped {tuple(shape)}")
    args = (c.value(std.x), list(std.dims), std.eps)
    scale = c.emit(ops.inv_std, args if std.correction is None else (*args, std.correction))
    in_groups = c.emit(aten.reshape.default, (c.value(value), list(grouped)))
    return c.emit(aten.reshape.default, (c.emit(ops.channel_gate, (in_groups, scale)), list(shape)))


@handles(aten.rsqrt.default)
def _rsqrt(c: _Canonicalizer, n: fx.Node):
    pending = c.pending(n.args[0])
    if pending is None or pending.squared or pending.root or pending.norm:
        raise c.unsupported("rsqrt of something other than a normaliser's mean(x²) + ε or var(x) + ε")
    args = (c.value(pending.x), list(pending.dims), pending.eps)
    return c.emit(ops.inv_std, args if pending.correction is None else (*args, pending.correction))


@handles(aten.clamp_min.default)
def _clamp_min(c: _Canonicalizer, n: fx.Node):
    """``max(‖x‖, ε)``, F.normalize's divisor (closed by the division, :func:`_divided_by_norm`)."""
    pending = c.pending(n.args[0])
    if pending is None or not pending.norm or pending.channel_dims or pending.floor is not None:
        raise c.unsupported("clamp_min of something other than a vector norm (F.normalize's max(‖x‖, ε))")
    return replace(pending, floor=float(n.args[1]))


def _divided_by_norm(c: _Canonicalizer, value: fx.Node, norm: _Pending) -> fx.Node:
    """``value / max(‖x‖, ε)`` with ``value`` = ``x``: ``F.normalize``, a gate by the statistic ``inv_norm``."""
    if norm.x is not value:
        raise c.unsupported("division by the norm of another tensor (only F.normalize's x / max(‖x‖, ε))")
    scale = c.emit(ops.inv_norm, (c.value(norm.x), list(norm.dims), norm.floor))
    return c.emit(ops.channel_gate, (c.value(value), scale))


def _divided_by_sum(c: _Canonicalizer, value: fx.Node, dims: list[int]) -> fx.Node:
    """``x / Σ_dims x`` (ConViT's renormalised attention mixture): a gate by the statistic ``inv_sum``, the
    normaliser a constant for the rules as LayerNorm's σ is."""
    return c.emit(ops.channel_gate, (c.value(value), c.emit(ops.inv_sum, (c.value(value), dims))))


def _divided_by_computed(c: _Canonicalizer, value: fx.Node, divisor: fx.Node) -> fx.Node:
    """``a / b`` with a computed ``b`` that closes no normaliser pattern (EfficientViT's linear attention,
    ``(q Kᵀ V) / (q Kᵀ 1 + ε)``): a gate by the statistic ``inverse(b)``, the divisor a constant for the rules as
    LayerNorm's σ is; gradients pass exactly."""
    return c.emit(ops.channel_gate, (c.value(value), c.emit(ops.inverse, (c.value(divisor),))))
