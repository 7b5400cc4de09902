"""Elementwise arithmetic: sums and products with constants become ``channel_affine``, sums of two computed tensors
``add``, products of a feature map and a gate ``channel_gate``; divisions that close a normaliser's statistic go to
:mod:`~fxrel.graphs.canonical.normalisers`."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.gates import _GATE_ACTIVATIONS, _gates, _is_statistic, _source, _unexpanded
from fxrel.graphs.canonical.logits import scaled_logits, shifted_logits
from fxrel.graphs.canonical.normalisers import (
    _divided_by_computed,
    _divided_by_norm,
    _divided_by_std,
    _divided_by_sum,
    _response_scale,
)
from fxrel.graphs.canonical.registry import handles
from fxrel.graphs.canonical.walker import _Canonicalizer
from fxrel.graphs.ops import aten


def _operand(c: _Canonicalizer, node: Any, like: fx.Node) -> torch.Tensor | None:
    """A constant operand (a Python number, a parameter or a folded constant) as a tensor in ``like``'s dtype, or
    ``None`` for a computed tensor."""
    if isinstance(node, fx.Node) and not c.is_const(node):
        return None
    dtype = like.meta["val"].dtype
    return c.const(node).to(dtype) if isinstance(node, fx.Node) else torch.tensor(node, dtype=dtype)


def _own_sum_dims(value: Any, divisor: Any) -> list[int] | None:
    """The dims over which ``divisor`` is ``value``'s own sum, kept or unsqueezed back to size 1 (``a / a.sum(-1,
    keepdim=True)``, ``a / a.sum(-1).unsqueeze(-1)``), else ``None``."""
    if not isinstance(value, fx.Node) or not isinstance(divisor, fx.Node):
        return None
    total = _source(divisor)
    if total.target is not aten.sum.dim_IntList or total.args[0] is not value or total.kwargs.get("dtype"):
        return None
    shape = value.meta["val"].shape
    dims = sorted({d % len(shape) for d in total.args[1]})
    kept = [1 if d in dims else size for d, size in enumerate(shape)]
    return dims if list(divisor.meta["val"].shape) == kept else None


def _affine(c: _Canonicalizer, x: fx.Node, scale: torch.Tensor | None, shift: torch.Tensor | None):
    """``x·scale + shift`` with constant ``scale``/``shift`` as a canonical ``channel_affine`` (layer scale, NFNet's
    α/β gains, ``x + 0``); an identity is dropped, keeping the shape a broadcast constant gave (an RNN's zero initial
    state ``[1, B, H]`` plus its input ``[B, H]``)."""
    if shift is not None and not bool((shift != 0).any()):
        shift = None
    if scale is None or (scale.numel() == 1 and float(scale) == 1.0):
        if shift is None:
            value, shape = c.value(x), list(c.current.meta["val"].shape)
            if list(x.meta["val"].shape) == shape:
                return value
            same_size = x.meta["val"].numel() == c.current.meta["val"].numel()
            return c.emit(aten.reshape.default if same_size else aten.expand.default, (value, shape))
        scale = torch.ones((), dtype=shift.dtype)
    return c.emit(ops.channel_affine, (c.value(x), c.param(scale, "scale"), c.param(shift, "shift")))


@handles(aten.add.Tensor, aten.sub.Tensor)
def _add(c: _Canonicalizer, n: fx.Node):
    """A sum of two computed tensors (residual connections), a difference as the sum with the negated operand (a
    constant scale −α); a constant added or subtracted is an affine shift."""
    a, b = n.args[:2]
    alpha = n.kwargs.get("alpha", 1)
    sign = -1 if n.target is aten.sub.Tensor else 1
    pending = c.pending(a)
    if pending is not None and not (pending.squared or pending.root) and sign == 1 and isinstance(b, (int, float)):
        return replace(pending, eps=pending.eps + b)
    for logits, other, factor in ((c.logits(a), b, sign * alpha), (c.logits(b), a, 1)):
        shift = None if logits is None or factor != 1 else _operand(c, other, n)
        if shift is not None:
            return shifted_logits(c, logits, shift)
    ca, cb = _operand(c, a, n), _operand(c, b, n)
    if ca is None and cb is None:   # a − α·b (PoolFormer's pool(x) − x) is the sum a + (−α)·b
        other = c.value(b) if sign * alpha == 1 else c.emit(ops.channel_affine, (
            c.value(b), c.param(torch.tensor(float(sign * alpha), dtype=n.meta["val"].dtype), "scale"), None))
        return c.emit(aten.add.Tensor, (c.value(a), other))
    if ca is not None and cb is not None:
        raise c.unsupported("sum of two constants that was not folded")
    if cb is not None:
        return _affine(c, a, None, cb * (sign * alpha))
    return _affine(c, b, torch.tensor(float(sign * alpha), dtype=ca.dtype), ca)


@handles(aten.mul.Tensor, aten.div.Tensor)
def _mul(c: _Canonicalizer, n: fx.Node):
    """A product with a constant is an affine (``x·s``, ``x/s``), a division by a computed divisor a gate by its
    inverse; a feature map times a broadcast gate
    (squeeze-excitation) or a same-shaped squashed branch is ``channel_gate(value, gate)``, a same-shaped activated
    branch (a gated linear unit) ``gated_unit(value, gate)``; any other
    product of two computed tensors is ``product(a, b)`` (the uniform rule splits its relevance)."""
    a, b = n.args[:2]
    if n.target is aten.div.Tensor and c.pending(a) is not None and c.pending(b) is not None:
        return _response_scale(c, c.pending(a), c.pending(b))
    if n.target is aten.div.Tensor and c.pending(b) is not None and c.pending(b).root:
        return _divided_by_std(c, a, c.pending(b))
    if n.target is aten.div.Tensor and c.pending(b) is not None and c.pending(b).floor is not None:
        return _divided_by_norm(c, a, c.pending(b))
    for logits, other in ((c.logits(a), b), (c.logits(b), a if n.target is aten.mul.Tensor else None)):
        factor = None if logits is None or other is None else _operand(c, other, n)
        if factor is not None:
            return scaled_logits(c, logits, 1 / factor if n.target is aten.div.Tensor else factor)
    if n.target is aten.div.Tensor and (dims := _own_sum_dims(a, b)) is not None:
        return _divided_by_sum(c, a, dims)
    if n.target is aten.div.Tensor:
        divisor = _operand(c, b, n)
        if _operand(c, a, n) is not None or n.kwargs.get("rounding_mode"):
            raise c.unsupported("division of a constant or with a rounding mode (only a computed tensor divided by "
                                "a constant or by a computed tensor is canonical)")
        return _affine(c, a, 1 / divisor, None) if divisor is not None else _divided_by_computed(c, a, b)
    for value, other in ((a, b), (b, a)):
        scale = _operand(c, other, n)
        if scale is not None and _operand(c, value, n) is None:
            return _affine(c, value, scale, None)
    sa, sb = _unexpanded(a), _unexpanded(b)
    squashed = [op for op in (a, b) if _source(op).target in _GATE_ACTIVATIONS or _is_statistic(c, _source(op))]
    if _gates(sb, sa):
        value, gate = a, b
    elif _gates(sa, sb):
        value, gate = b, a
    elif sa == sb and len(squashed) == 1:  # same shapes (1×1 maps, GhostNetV2's upsampled gate): the squashed one
        gate = squashed[0]
        value = b if gate is a else a
    elif sa == sb and len(activated := [op for op in (a, b) if _source(op).target in ops.ACTIVATIONS]) == 1:
        gate = activated[0]   # a gated MLP (SwiGLU: silu(x W_g) ⊙ x W_x): the activated branch gates, as in LXT's CP
        value = b if gate is a else a
        return c.emit(ops.gated_unit, (c.value(value), c.value(gate)))
    else:   # two computed tensors, neither a gate: a product (gMLP's spatial gating, FocalNet's modulation)
        return c.emit(ops.product, (c.value(a), c.value(b)))
    return c.emit(ops.channel_gate, (c.value(value), c.value(gate)))


@handles(aten.neg.default)
def _neg(c: _Canonicalizer, n: fx.Node):
    """``−x`` (EVA's rotary embedding rotates channel pairs): an affine scale −1."""
    return _affine(c, n.args[0], torch.tensor(-1.0, dtype=n.meta["val"].dtype), None)


@handles(aten.addcmul.default)
def _addcmul(c: _Canonicalizer, n: fx.Node):
    """``a + value·b·t`` with constants ``a``, ``b`` and a computed ``t`` (GRN's affine): an affine of ``t``."""
    a, b, t = n.args[:3]
    value = n.kwargs.get("value", 1)
    shift, scale = _operand(c, a, n), _operand(c, b, n)
    if shift is None or scale is None or _operand(c, t, n) is not None:
        raise c.unsupported("addcmul of computed tensors (only constant + constant·tensor is canonical)")
    return _affine(c, t, scale * value, shift)
