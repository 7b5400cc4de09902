"""Gates and attention: what makes a product a gate (:func:`_gates`, :func:`_source` …), broadcasting with
``expand``, softmax weights, attention pooling (``matmul``) and scaled dot-product attention."""
from __future__ import annotations

import math

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.normalisers import _reshaped
from fxrel.graphs.canonical.reductions import _spatial_sum
from fxrel.graphs.canonical.registry import handles
from fxrel.graphs.canonical.walker import _Canonicalizer
from fxrel.graphs.ops import aten


def _gates(gate: torch.Size, value: torch.Size) -> bool:
    """``gate`` broadcasts onto ``value`` along non-batch dims only, and is smaller."""
    return (len(gate) == len(value) and gate[0] == value[0] and all(g in (v, 1) for g, v in zip(gate, value))
            and any(g == 1 and v != 1 for g, v in zip(gate[1:], value[1:])))


#: what squashes a gate into [0, 1]: a product of two same-shaped tensors gates the other one
_GATE_ACTIVATIONS = (aten.sigmoid.default, aten.hardsigmoid.default, aten.softmax.int, aten._softmax.default)


def _source(node: fx.Node) -> fx.Node:
    """``node`` behind any ``expand``, reshaping and nearest upsampling."""
    while node.target in (aten.expand.default, aten.upsample_nearest2d.vec) or node.target in ops.SHAPE_OPS:
        node = node.args[0]
    return node


def _unexpanded(node: fx.Node) -> torch.Size:
    """The shape of ``node`` before an ``expand`` (which :func:`_expand` leaves implicit)."""
    while node.target is aten.expand.default:
        node = node.args[0]
    return node.meta["val"].shape


def _is_statistic(c: _Canonicalizer, node: fx.Node) -> bool:
    """``node`` was canonicalised to a statistic (1/σ, a response scale, softmax weights)."""
    value = c.env.get(node)
    return isinstance(value, fx.Node) and value.meta.get("fxrel_kind") == ops.STAT


@handles(aten.expand.default)
def _expand(c: _Canonicalizer, n: fx.Node):
    """``gate.expand_as(x)`` feeding products only (ECA, SE variants): left as an implicit broadcast."""
    if c.pending(n.args[0]) is not None:
        return _reshaped(c, n)
    if not n.users or any(u.target is not aten.mul.Tensor for u in n.users):
        raise c.unsupported("expand whose result is used other than in a product with a feature map")
    return c.value(n.args[0])


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(c: _Canonicalizer, n: fx.Node):
    """Softmax weights (SKNet's branch attention, global-context attention pooling): a statistic that gates."""
    return c.emit(aten.softmax.int, (c.value(n.args[0]), n.args[1]))


@handles(aten.matmul.default, aten.bmm.default)
def _matmul(c: _Canonicalizer, n: fx.Node):
    """``values @ weights`` with softmax attention weights shaped ``[…, K, 1]`` (global-context attention pooling)
    is the gate ``values ⊙ weightsᵀ`` summed over ``K``: the weights are a gate (the AH-rule keeps them constant)."""
    a, b = n.args
    weights_last = b.meta["val"].shape[-1] == 1 and _source(b).target in (aten.softmax.int, aten._softmax.default)
    if not weights_last or c.is_const(a) or len(a.meta["val"].shape) < 3:
        raise c.unsupported("product of two computed matrices (only a feature map times softmax attention "
                            "weights shaped [..., K, 1] is canonical)")
    gate = c.emit(aten.transpose.int, (c.value(b), -1, -2))
    gated = c.emit(ops.channel_gate, (c.value(a), gate))
    rank = len(a.meta["val"].shape)
    count = a.meta["val"].shape[-1]
    return _spatial_sum(c, gated, [rank - 1], True, count, a.meta["val"].dtype)


@handles(aten.scaled_dot_product_attention.default)
def _attention(c: _Canonicalizer, n: fx.Node):
    """Scaled dot-product attention (conv/attention hybrids): ``attend(v, attention_weights(q, k))``, the weights a
    statistic that relevance rules keep constant (the AH-rule); no mask, causal masking, dropout or grouped heads."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, n.args), **n.kwargs)
    if a.get("attn_mask") is not None or a.get("dropout_p") or a.get("is_causal") or a.get("enable_gqa"):
        raise c.unsupported("attention with a mask, dropout, causal masking or grouped heads")
    scale = a.get("scale") or 1 / math.sqrt(a["query"].meta["val"].shape[-1])
    weights = c.emit(ops.attention_weights, (c.value(a["query"]), c.value(a["key"]), scale))
    return c.emit(ops.attend, (c.value(a["value"]), weights))
