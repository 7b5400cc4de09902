"""Handlers for parametrised layers: convolutions, linear layers, Batch/Layer/GroupNorm."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.registry import handles
from fxrel.graphs.canonical.walker import _Canonicalizer
from fxrel.graphs.ops import aten


def _per_dim(value: Any, dims: int) -> list[int]:
    """A convolution's stride/padding/dilation argument (an int, or one value or one per spatial dim) as one value
    per spatial dim."""
    value = [value] if isinstance(value, int) else list(value)
    return value * dims if len(value) == 1 else value


@handles(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
def _conv(c: _Canonicalizer, n: fx.Node):
    x, w, b = n.args[0], n.args[1], ops.argument(n, "bias", None)
    weight = c.const(w)
    dims = weight.dim() - 2
    if n.target is aten.convolution.default:
        _, _, _, stride, padding, dilation, transposed, output_padding, groups = n.args
        if transposed:
            return _transposed(c, x, weight, c.const(b), *(_per_dim(v, dims) for v in (
                stride, padding, output_padding)), groups, _per_dim(dilation, dims))
    else:
        names = ("stride", "padding", "dilation", "groups")
        given = dict(zip(names, n.args[3:]), **n.kwargs)
        stride, padding = given.get("stride", [1] * dims), given.get("padding", [0] * dims)
        dilation, groups = given.get("dilation", [1] * dims), given.get("groups", 1)
    stride, dilation = _per_dim(stride, dims), _per_dim(dilation, dims)
    source = c.value(x)
    if isinstance(padding, str):
        source, padding = _string_padding(c, source, padding, weight, stride, dilation)
    return c.emit(aten.convolution.default,
                  (source, c.param(weight, "weight"), c.param(c.const(b), "bias"), stride,
                   _per_dim(padding, dims), dilation, False, [0] * dims, groups))


@handles(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def _conv_transpose(c: _Canonicalizer, n: fx.Node):
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    a = dict(zip(names, n.args), **n.kwargs)
    weight = c.const(a["weight"])
    dims = weight.dim() - 2
    stride, padding, output_padding, dilation = (_per_dim(a.get(name, default), dims) for name, default in (
        ("stride", 1), ("padding", 0), ("output_padding", 0), ("dilation", 1)))
    return _transposed(c, a["input"], weight, c.const(a.get("bias")), stride, padding, output_padding,
                       a.get("groups", 1), dilation)


def _transposed(c: _Canonicalizer, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                padding: list[int], output_padding: list[int], groups: int, dilation: list[int]) -> fx.Node:
    """A transposed convolution (LowFormer's upsampling) as the convolution it is the adjoint of: ``s − 1`` zeros
    inserted after every input pixel (a copying op), the result padded by ``d(k − 1) − p`` (``+ output_padding``
    after, less the ``s − 1`` trailing zeros; negative amounts crop), then a stride-1 convolution with the kernel
    flipped and its in/out channels swapped per group. The same linear map, so every convolution rule applies."""
    dims = weight.dim() - 2
    shape = list(x.meta["val"].shape)
    value = c.value(x)
    if any(s > 1 for s in stride):
        spread = [*shape[:2], *[v for size in shape[2:] for v in (size, 1)]]
        value = c.emit(aten.reshape.default, (value, spread))
        value = c.emit(aten.constant_pad_nd.default, (value, [p for s in reversed(stride) for p in (0, s - 1, 0, 0)],
                                                      0.0))
        value = c.emit(aten.reshape.default, (value, [*shape[:2], *[size * s for size, s in zip(shape[2:], stride)]]))
    reach = [d * (k - 1) - p for d, k, p in zip(dilation, weight.shape[2:], padding)]
    pads = [q for i in reversed(range(dims)) for q in (reach[i], reach[i] + output_padding[i] - (stride[i] - 1))]
    if any(pads):
        value = c.emit(aten.constant_pad_nd.default, (value, pads, 0.0))
    c_in, c_out = weight.shape[0], weight.shape[1] * groups
    kernel = weight.reshape(groups, c_in // groups, c_out // groups, *weight.shape[2:]).transpose(1, 2)
    kernel = kernel.reshape(c_out, c_in // groups, *weight.shape[2:]).flip(list(range(2, 2 + dims))).contiguous()
    return c.emit(aten.convolution.default, (value, c.param(kernel, "weight"), c.param(bias, "bias"), [1] * dims,
                                             [0] * dims, list(dilation), False, [0] * dims, groups))


def _string_padding(c: _Canonicalizer, x: fx.Node, padding: str, weight: torch.Tensor, stride: list[int],
                    dilation: list[int]) -> tuple[fx.Node, list[int]]:
    """``padding="valid"`` (none) or ``"same"`` (stride 1: ``d·(k − 1)`` in all, the odd pixel after, as torch
    does) as explicit padding; an uneven split becomes a zero ``constant_pad_nd`` before the convolution."""
    kernel = list(weight.shape[2:])
    if padding == "valid":
        return x, [0] * len(kernel)
    if padding != "same" or any(s != 1 for s in stride):
        raise c.unsupported(f"padding='{padding}' with stride {stride} (only 'valid' and stride-1 'same')")
    totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if all(t % 2 == 0 for t in totals):
        return x, [t // 2 for t in totals]
    pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]   # constant_pad_nd: last dim first
    return c.emit(aten.constant_pad_nd.default, (x, pads, 0.0)), [0] * len(kernel)


@handles(aten.linear.default)
def _linear(c: _Canonicalizer, n: fx.Node):
    b = ops.argument(n, "bias", None)
    return c.emit(aten.linear.default, (c.value(n.args[0]), c.param(c.const(n.args[1]), "weight"),
                                        c.param(c.const(b), "bias")))


@handles(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
def _batch_norm(c: _Canonicalizer, n: fx.Node):
    if n.target is aten.batch_norm.default:
        x, w, b, mean, var, training, _, eps = n.args[:8]
        if training:
            raise c.unsupported("BatchNorm in training mode")
    else:
        x, w, b, mean, var, _, eps = n.args
    mean, var = c.const(mean), c.const(var)
    w, b = c.const(w), c.const(b)
    scale = torch.rsqrt(var + eps) * (w if w is not None else 1.0)
    shift = (b if b is not None else 0.0) - mean * scale
    rank = len(n.meta["val"][0].shape if isinstance(n.meta["val"], (tuple, list)) else n.meta["val"].shape)
    view = (-1,) + (1,) * (rank - 2)
    node = c.emit(ops.channel_affine, (c.value(x), c.param(scale.reshape(view), "scale"),
                                       c.param(shift.reshape(view), "shift")))
    return (node,) if n.target is aten._native_batch_norm_legit_no_training.default else node


def _normalized(c: _Canonicalizer, x: fx.Node, dims: list[int], eps: float, weight: torch.Tensor | None,
                bias: torch.Tensor | None) -> fx.Node:
    """``(x − μ)/σ · γ + β`` over ``dims`` as ``affine(gate(center(x), inv_std(center(x))))``: the mean subtraction
    is linear, 1/σ a statistic gating it (the LN-rule keeps it constant), γ, β a per-channel affine."""
    centered = c.emit(ops.center, (x, dims))
    normalized = c.emit(ops.channel_gate, (centered, c.emit(ops.inv_std, (centered, dims, eps))))
    if weight is None and bias is None:
        return normalized
    weight = torch.ones_like(bias) if weight is None else weight
    return c.emit(ops.channel_affine, (normalized, c.param(weight, "scale"), c.param(bias, "shift")))


@handles(aten.layer_norm.default)
def _layer_norm(c: _Canonicalizer, n: fx.Node):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = dict(zip(names, n.args), **n.kwargs)
    rank = len(a["input"].meta["val"].shape)
    dims = list(range(rank - len(a["normalized_shape"]), rank))
    return _normalized(c, c.value(a["input"]), dims, a.get("eps", 1e-5), c.const(a.get("weight")),
                       c.const(a.get("bias")))


@handles(aten.rms_norm.default)
def _rms_norm(c: _Canonicalizer, n: fx.Node):
    """``F.rms_norm``: ``x · (mean(x²) + ε)^(−1/2) · γ`` over the normalised dims, a gate by the statistic
    ``inv_std`` of ``x`` itself (no centring) and a per-channel scale; ``eps=None`` is the dtype's epsilon, as torch
    takes it."""
    names = ("input", "normalized_shape", "weight", "eps")
    a = dict(zip(names, n.args), **n.kwargs)
    x = a["input"]
    rank = x.meta["val"].dim()
    dims = list(range(rank - len(a["normalized_shape"]), rank))
    eps = a.get("eps")
    eps = torch.finfo(x.meta["val"].dtype).eps if eps is None else eps
    value = c.value(x)
    normalized = c.emit(ops.channel_gate, (value, c.emit(ops.inv_std, (value, dims, eps))))
    weight = c.const(a.get("weight"))
    return normalized if weight is None else c.emit(ops.channel_affine, (normalized, c.param(weight, "scale"), None))


@handles(aten.group_norm.default)
def _group_norm(c: _Canonicalizer, n: fx.Node):
    """GroupNorm: the channels viewed as ``[N, G, C/G·H·W]``, normalised over the last axis, viewed back."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    a = dict(zip(names, n.args), **n.kwargs)
    shape = list(a["input"].meta["val"].shape)
    grouped = c.emit(aten.reshape.default, (c.value(a["input"]), [shape[0], a["num_groups"], -1]))
    normalized = c.emit(aten.reshape.default, (_normalized(c, grouped, [2], a.get("eps", 1e-5), None, None), shape))
    weight, bias = c.const(a.get("weight")), c.const(a.get("bias"))
    if weight is None and bias is None:
        return normalized
    view = (-1,) + (1,) * (len(shape) - 2)
    weight = torch.ones_like(bias) if weight is None else weight
    bias = None if bias is None else bias.reshape(view)
    return c.emit(ops.channel_affine, (normalized, c.param(weight.reshape(view), "scale"), c.param(bias, "shift")))


@handles(aten.einsum.default)
def _einsum(c: _Canonicalizer, n: fx.Node):
    """``einsum(eq, x, W)`` of a computed ``x`` and a constant ``W`` (MViTv2's and SAM's decomposed relative position
    logits, ``byhwc,hkc->byhwk``): a linear map of ``x``, :func:`contract_with_constant`."""
    equation, operands = n.args[0].replace(" ", ""), n.args[1]
    if len(operands) != 2 or "..." in equation or "->" not in equation:
        raise c.unsupported("einsum other than of two operands with explicit indices and output")
    (xs, ws), out = equation.split("->")[0].split(","), equation.split("->")[1]
    x, w = operands
    if c.is_const(x) and not c.is_const(w):
        x, w, xs, ws = w, x, ws, xs
    if c.is_const(x) or not c.is_const(w):
        raise c.unsupported("einsum of two computed tensors (only a computed tensor with a constant is canonical)")
    return contract_with_constant(c, c.value(x), list(x.meta["val"].shape), xs, c.const(w), ws, out)


def contract_with_constant(c: _Canonicalizer, x: fx.Node, shape: list[int], xs: str, weight: torch.Tensor, ws: str,
                           out: str) -> fx.Node:
    """``einsum(f"{xs},{ws}->{out}", x, weight)`` for a computed ``x`` (a canonical node, shaped ``shape``) and a
    constant ``weight``, written as a grouped 1 × 1 convolution.

    The indices of ``x`` split into the contracted ones ``C`` (in ``weight``, not in the output), the group ones ``G``
    (in ``weight`` and the output: one matrix per group), and the free ones ``F`` (the output's, with the batch
    first). ``x`` is permuted to ``[F₀, G·C, F_rest, 1]``, convolved with ``weight`` as ``[G·K, C, 1, 1]`` in ``G``
    groups (``K``: the weight's output indices), and reshaped and permuted back; indices of ``weight`` alone are
    summed into it first."""
    equation = f"{xs},{ws}->{out}"
    if len(set(xs)) != len(xs) or len(set(ws)) != len(ws) or any(i not in out for i in xs if i not in ws):
        raise c.unsupported(f"einsum '{equation}' with a repeated index or a sum over the computed tensor alone")
    alone = [d for d, i in enumerate(ws) if i not in xs and i not in out]
    if alone:
        weight, ws = weight.sum(alone), "".join(i for i in ws if i in xs or i in out)
    groups = [i for i in xs if i in ws and i in out]
    contracted = [i for i in xs if i in ws and i not in out]
    free = [i for i in xs if i not in ws]
    kept = [i for i in ws if i not in xs]
    if not free or free[0] != xs[0]:
        raise c.unsupported(f"einsum '{equation}' whose computed tensor's first (batch) index is contracted")
    sizes = dict(zip(xs, shape)) | dict(zip(ws, weight.shape))
    count = lambda indices: math.prod(sizes[i] for i in indices)  # noqa: E731
    order = [free[0], *groups, *contracted, *free[1:]]
    rows = c.emit(aten.permute.default, (x, [xs.index(i) for i in order]))
    rows = c.emit(aten.reshape.default, (rows, [sizes[free[0]], count(groups + contracted), count(free[1:]), 1]))
    kernel = weight.permute([ws.index(i) for i in groups + kept + contracted])
    kernel = kernel.reshape(count(groups + kept), count(contracted), 1, 1).contiguous()
    mixed = c.emit(aten.convolution.default, (rows, c.param(kernel, "weight"), None, [1, 1], [0, 0], [1, 1], False,
                                              [0, 0], count(groups) if groups else 1))
    produced = [free[0], *groups, *kept, *free[1:]]
    mixed = c.emit(aten.reshape.default, (mixed, [sizes[i] for i in produced]))
    return c.emit(aten.permute.default, (mixed, [produced.index(i) for i in out]))
