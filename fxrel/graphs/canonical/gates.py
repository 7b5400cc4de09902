"""Gates and attention: what makes a product a gate (:func:`_gates`, :func:`_source` …), broadcasting with
``expand``, softmax weights, attention pooling (``matmul``), scaled dot-product attention, and attention written out
(``q @ kᵀ`` scaled, biased and reshaped on its way to a softmax, then ``@ v``)."""
from __future__ import annotations

import math

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.layers import contract_with_constant
from fxrel.graphs.canonical.normalisers import _reshaped
from fxrel.graphs.canonical.pending import _Logits
from fxrel.graphs.canonical.reductions import _sum_as_mean
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
    """``gate.expand_as(x)`` feeding products only (ECA, SE variants): left as an implicit broadcast. Any other
    ``expand`` of a computed tensor of the same rank (BoTNet's relative position logits, copied over the query rows)
    is an explicit copy: its VJP sums over the dims it broadcasts."""
    if c.pending(n.args[0]) is not None:
        return _reshaped(c, n)
    if n.users and all(u.target is aten.mul.Tensor for u in n.users):
        return c.value(n.args[0])
    if len(n.args[1]) != n.args[0].meta["val"].dim():
        raise c.unsupported("expand that adds dims, used other than in a product with a feature map")
    return c.emit(aten.expand.default, (c.value(n.args[0]), list(n.args[1])))


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(c: _Canonicalizer, n: fx.Node):
    """Softmax weights (SKNet's branch attention, global-context attention pooling): a statistic that gates; over
    the last axis of attention logits written out (:class:`_Logits`), the ``attention_weights`` they close."""
    logits = c.logits(n.args[0])
    if logits is None:
        return c.emit(aten.softmax.int, (c.value(n.args[0]), n.args[1]))
    if n.args[1] % len(logits.shape) != len(logits.shape) - 1:
        raise c.unsupported("a softmax of attention logits over another axis than the keys")
    return _attention_weights(c, logits.q, c.emit(aten.transpose.int, (logits.kt, -1, -2)), logits.scale,
                              logits.bias, logits.shape, logits.base)


def _attention_weights(c: _Canonicalizer, q: fx.Node, k: fx.Node, scale: torch.Tensor | float,
                       bias: torch.Tensor | None, shape: tuple[int, ...], base: tuple[int, ...]) -> fx.Node:
    """``attention_weights(q·s, k, 1, bias)`` (a tensor scale ``s`` folded into ``q`` as an affine, a number kept as
    the op's scale) for logits shaped ``base`` (``bias`` broadcasts to ``shape``, the shape they were viewed in),
    reshaped to ``shape``."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)
    if isinstance(scale, torch.Tensor):   # per-head temperatures (XCiT): [heads, 1, 1] on the logits
        scale = scale.to(c.current.meta["val"].dtype)
        q, scale = c.emit(ops.channel_affine, (q, c.param(scale, "scale"), None)), 1.0
    if bias is not None:
        bias = bias.expand(shape).reshape(base)
        batch = bias.shape[0]
        if batch > 1 and bool((bias == bias[:1]).all()):
            bias = bias[:1]
        bias = c.param(bias.contiguous(), "attention_bias")
    weights = c.emit(ops.attention_weights, (q, k, scale, bias) if bias is not None else (q, k, scale))
    return weights if shape == base else c.emit(aten.reshape.default, (weights, list(shape)))


def _weights_of(c: _Canonicalizer, node: fx.Node) -> bool:
    """``node`` is attention weights: a softmax over the keys (``attention_weights``, or a softmax of logits mixed
    first), behind reshapes, the linear maps of talking heads, affine mixtures with constant weights and a division
    by their own sum (ConViT's content and position attention)."""
    value = c.env.get(node)
    while isinstance(value, fx.Node) and (value.meta.get("fxrel_kind") in (ops.SHAPE, ops.LINEAR, ops.AFFINE) or (
            value.target is ops.channel_gate and value.args[1].target is ops.inv_sum)):   # renormalised weights
        value = value.args[0]
    return isinstance(value, fx.Node) and value.target in (ops.attention_weights, aten.softmax.int)


def _constant_matrix(c: _Canonicalizer, x: fx.Node, matrix: torch.Tensor, on_left: bool) -> fx.Node:
    """``x @ W`` (``on_left=False``) or ``W @ x`` as a bias-free ``linear`` over ``x``'s last or second-to-last dim."""
    if not on_left:
        return c.emit(aten.linear.default, (x, c.param(matrix.t().contiguous(), "weight"), None))
    rows = c.emit(aten.transpose.int, (x, -1, -2))
    mapped = c.emit(aten.linear.default, (rows, c.param(matrix.contiguous(), "weight"), None))
    return c.emit(aten.transpose.int, (mapped, -1, -2))


def _batched_constant(c: _Canonicalizer, n: fx.Node) -> fx.Node:
    """``x @ W`` or ``W @ x`` with a constant ``W`` of more than two dims (LambdaNets' relative position embeddings,
    one ``[k, j]`` matrix per query position): the contraction as :func:`contract_with_constant` writes it, batch
    dims broadcast as ``matmul`` does (a dim of size 1 in ``W`` is ``x``'s own; one of size 1 in ``x`` takes ``W``'s
    size, ``x`` squeezed there)."""
    a, b = n.args
    on_left = c.is_const(a)
    weight, x = (c.const(a), b) if on_left else (c.const(b), a)
    shape, rank = list(x.meta["val"].shape), max(weight.dim(), x.meta["val"].dim())
    if x.meta["val"].dim() < 2 or weight.dim() < 2:
        raise c.unsupported("product of a constant with a vector (only matrix products are canonical)")
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    batch = [next(letters) for _ in range(rank - 2)]
    m, k, last = next(letters), next(letters), next(letters)
    xs, ws, out, x_dims = [], [], [], []
    for i, letter in enumerate(batch):
        xd = i - (rank - 2) + len(shape) - 2
        wd = i - (rank - 2) + weight.dim() - 2
        xsize = shape[xd] if xd >= 0 else 1
        wsize = weight.shape[wd] if wd >= 0 else 1
        if xd >= 0 and (xsize > 1 or wsize == 1):
            xs.append(letter)
            x_dims.append(xd)
        if wd >= 0 and wsize > 1:
            ws.append(letter)
        if xsize > 1 or wsize > 1 or xd >= 0:
            out.append(letter)
    weight = weight.squeeze([d for d in range(weight.dim() - 2) if weight.shape[d] == 1]) if weight.dim() > 2 \
        else weight
    x_dims += [len(shape) - 2, len(shape) - 1]
    value = c.value(x)
    if len(x_dims) < len(shape):
        value = c.emit(aten.reshape.default, (value, [shape[d] for d in x_dims]))
    if on_left:   # W[…, m, k] @ x[…, k, n]
        ws, xs, out = [*ws, m, k], [*xs, k, last], [*out, m, last]
    else:         # x[…, m, k] @ W[…, k, n]
        xs, ws, out = [*xs, m, k], [*ws, k, last], [*out, m, last]
    mixed = contract_with_constant(c, value, [shape[d] for d in x_dims], "".join(xs), weight, "".join(ws),
                                   "".join(out))
    if len(out) == len(n.meta["val"].shape):   # only batch dims of size 1 in both factors are left out
        return mixed
    return c.emit(aten.reshape.default, (mixed, list(n.meta["val"].shape)))


@handles(aten.matmul.default, aten.bmm.default)
def _matmul(c: _Canonicalizer, n: fx.Node):
    """Products of two computed tensors: attention weights times values (``attend``; ``v @ aᵀ`` as LeViT's conv
    attention writes it is ``attend(vᵀ, a)ᵀ``); ``q @ kᵀ`` (attention logits, followed to their softmax as
    :class:`_Logits`); and ``values @ weights`` with softmax weights shaped ``[…, K, 1]`` (global-context attention
    pooling), the gate ``values ⊙ weightsᵀ`` summed over ``K`` (the AH-rule keeps the weights constant). A product
    with a constant matrix is a linear map: ``x @ W = linear(x, Wᵀ)``, ``W @ x = linear(xᵀ, W)ᵀ`` (BoTNet's relative
    position logits, SwiftFormer's additive-attention vector)."""
    a, b = n.args
    for matrix, x, on_left in ((b, a, False), (a, b, True)):
        if c.is_const(matrix) and not c.is_const(x) and c.const(matrix).dim() == 2 and x.meta["val"].dim() >= 2:
            return _constant_matrix(c, c.value(x), c.const(matrix), on_left)
    if c.is_const(a) != c.is_const(b):
        return _batched_constant(c, n)
    if c.is_const(a):
        raise c.unsupported("product of two constants that was not folded")
    if len(a.meta["val"].shape) < 3:   # CSATv2's scalar-head attention: q @ kᵀ of [B, N] rows is [B, B]
        raise c.unsupported(f"a product of two computed matrices {list(a.meta['val'].shape)} @ "
                            f"{list(b.meta['val'].shape)} without a batch dim: it contracts or mixes the samples of "
                            "a batch")
    if _weights_of(c, a):
        return c.emit(ops.attend, (c.value(b), c.value(a)))
    if b.target is aten.transpose.int and _weights_of(c, b.args[0]):
        values = c.emit(aten.transpose.int, (c.value(a), -1, -2))
        return c.emit(aten.transpose.int, (c.emit(ops.attend, (values, c.value(b.args[0]))), -1, -2))
    weights_last = b.meta["val"].shape[-1] == 1 and _source(b).target in (aten.softmax.int, aten._softmax.default)
    if weights_last:
        gate = c.emit(aten.transpose.int, (c.value(b), -1, -2))
        gated = c.emit(ops.channel_gate, (c.value(a), gate))
        rank = len(a.meta["val"].shape)
        count = a.meta["val"].shape[-1]
        return _sum_as_mean(c, gated, [rank - 1], True, count, a.meta["val"].dtype)
    shape = tuple(n.meta["val"].shape)
    return _Logits(c.value(a), c.value(b), shape, shape)


@handles(aten.scaled_dot_product_attention.default)
def _attention(c: _Canonicalizer, n: fx.Node):
    """Scaled dot-product attention: ``attend(v, attention_weights(q, k, scale, bias))``, the weights a statistic
    that relevance rules keep constant (the AH-rule) unless a rule set explains them (AttnLRP). A float
    ``attn_mask`` (TinyViT's, Swin's position bias and window mask) is the constant attention bias, a boolean one
    and causal masking become −∞ where masked; no dropout or grouped heads."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, n.args), **n.kwargs)
    if a.get("dropout_p") or a.get("enable_gqa"):
        raise c.unsupported("attention with dropout or grouped heads")
    q, k = a["query"].meta["val"], a["key"].meta["val"]
    scale = a.get("scale") or 1 / math.sqrt(q.shape[-1])
    shape = (*q.shape[:-1], k.shape[-2])
    bias = None
    if a.get("attn_mask") is not None and not c.is_const(a["attn_mask"]):
        return _computed_bias(c, a, scale, shape)
    if a.get("attn_mask") is not None:
        mask = c.const(a["attn_mask"])
        bias = torch.where(mask, 0.0, -math.inf).to(q.dtype) if mask.dtype == torch.bool else mask.to(q.dtype)
    if a.get("is_causal"):
        causal = torch.full(shape[-2:], -math.inf, dtype=q.dtype).triu(1)
        bias = causal if bias is None else bias + causal
    if c.is_const(a["query"]) and not c.is_const(a["key"]):
        return _latent_query(c, a["query"], a["key"], a["value"], scale, bias)
    weights = _attention_weights(c, c.value(a["query"]), c.value(a["key"]), scale, bias, shape, shape)
    return c.emit(ops.attend, (c.value(a["value"]), weights))


def _computed_bias(c: _Canonicalizer, a: dict, scale: float, shape: tuple[int, ...]) -> fx.Node:
    """Attention whose float mask is computed (SAM's decomposed relative positions, computed from the queries): the
    logits ``q kᵀ·s`` a bilinear product, the bias added to them (a sum), their softmax the weights (a statistic)."""
    if a["attn_mask"].meta["val"].dtype == torch.bool or a.get("is_causal"):
        raise c.unsupported("attention with a computed boolean mask or a computed mask and causal masking")
    kt = c.emit(aten.transpose.int, (c.value(a["key"]), -1, -2))
    logits = c.materialised(_Logits(c.value(a["query"]), kt, shape, shape, scale))
    biased = c.emit(aten.add.Tensor, (logits, c.value(a["attn_mask"])))
    return c.emit(ops.attend, (c.value(a["value"]), c.emit(aten.softmax.int, (biased, -1))))


def _latent_query(c: _Canonicalizer, query: fx.Node, key: fx.Node, value: fx.Node, scale: float,
                  bias: torch.Tensor | None) -> fx.Node:
    """Attention from a learned query (attention pooling on latent tokens: NaFlexViT's and SigLIP's MAP heads): the
    logits ``k qᵀ·s`` are a linear map of the keys, one matrix per head (:func:`contract_with_constant`), their
    softmax over the keys the weights (a statistic) that ``attend`` mixes the values with."""
    q = c.const(query)
    if q.dim() != 4 or key.meta["val"].dim() != 4 or bias is not None or not bool((q == q[:1]).all()):
        raise c.unsupported("attention from a constant query other than one [1, heads, queries, dim] latent shared by "
                            "every sample, without a mask")
    logits = contract_with_constant(c, c.value(key), list(key.meta["val"].shape), "bhjd", q[0] * scale, "hid",
                                    "bhij")
    return c.emit(ops.attend, (c.value(value), c.emit(aten.softmax.int, (logits, -1))))
