"""Canonicalisation: map a captured ATen graph onto fxrel's closed op set (see :mod:`fxrel.graphs.ops`).

The pass is a single walk over the captured graph with one small handler per ATen target. It

* evaluates every node that computes from parameters and constants alone (NFNet's weight standardisation, a layer
  scale's reshape) and keeps the result as a constant;
* turns every convolution into ``aten.convolution``, BatchNorm and products/sums with constants into
  ``channel_affine``;
* turns Layer/Group/RMS/Simple/EvoNorm into ``affine(gate(center(x), stat))``, ConvNeXt-V2's response
  normalisation, softmax branch attention and attention pooling into gates, and scaled dot-product attention into
  ``attend(v, attention_weights(q, k))`` — statistics are recognised from their op pattern (``rsqrt(mean(x²) + ε)``
  …) while it is walked, emitting nothing until the pattern closes;
* drops no-ops (eval-mode dropout, ``_assert`` nodes, identity copies, dtype casts);
* records on every node: ``fxrel_kind``, the module it came from (``fxrel_module``), its source line
  (``fxrel_source``), the original ATen target (``fxrel_origin``), and, after shape propagation, ``tensor_meta``.

A second pass folds each per-channel affine into a directly preceding conv/linear whose output has no other user
(``fold_affine``): ``W' = W·s``, ``b' = b·s + t``. An affine that cannot be folded (DenseNet's pre-activation
BatchNorm after a concatenation) stays an ``affine`` node. Any other target raises :class:`UnsupportedOpError`
naming the node, its target and its source line.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxrel.errors import UnsupportedOpError
from fxrel.graphs import ops
from fxrel.graphs.ops import aten

Handler = Callable[["_Canonicalizer", fx.Node], Any]
HANDLERS: dict[Any, Handler] = {}


def handles(*targets: Any) -> Callable[[Handler], Handler]:
    """Register a canonicalisation handler for ATen targets."""
    def register(fn: Handler) -> Handler:
        for t in targets:
            HANDLERS[t] = fn
        return fn
    return register


def source_line(node: fx.Node) -> str:
    """The innermost user-code frame of a node's stack trace, as ``file:line: code`` (or ``<unknown>``)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i, ln in enumerate(lines)
              if ln.startswith("File ")]
    if not frames:
        return "<unknown>"
    where, code = frames[-1]
    return f"{where.removeprefix('File ')}: {code}"


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost ``nn.Module`` that produced a node ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


class _Canonicalizer:
    def __init__(self, captured: fx.GraphModule) -> None:
        self.src = captured
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.current: fx.Node | None = None
        self.n_params = 0
        self.consts: dict[fx.Node, Any] = {}

    # -- helpers used by handlers ---------------------------------------------------------------------------------
    def const(self, node: Any) -> torch.Tensor | None:
        """The concrete tensor behind a parameter/buffer argument or a folded constant (``None`` stays ``None``)."""
        if node is None:
            return None
        if not self.is_const(node):
            raise self.unsupported(f"expected a parameter, got a computed value {node}")
        return self.consts[node]

    def is_const(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.consts

    def fold(self, node: fx.Node) -> bool:
        """Evaluate ``node`` now if it computes from parameters and constants only (NFNet's weight standardisation,
        a layer scale's reshape); record the result as a constant and return True."""
        inputs = node.all_input_nodes
        if not all(self.is_const(a) for a in inputs) or not _is_tensors(node.meta.get("val")):
            return False
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: self.consts[a])
        with torch.no_grad():
            self.consts[node] = node.target(*args, **kwargs)
        return True

    def param(self, value: torch.Tensor | None, name: str) -> fx.Node | None:
        """Register ``value`` as an attribute of the canonical module and return its ``get_attr`` node."""
        if value is None:
            return None
        attr = f"{name}_{self.n_params}"
        self.n_params += 1
        self.root.register_buffer(attr, value.detach(), persistent=False)
        node = self.graph.get_attr(attr)
        node.meta["fxrel_kind"] = ops.PARAM
        return node

    def value(self, node: Any) -> Any:
        if isinstance(self.env.get(node) if isinstance(node, fx.Node) else None, _Pending):
            raise self.unsupported(f"'{node.name}' is part of a normalising statistic that does not end in rsqrt")
        if self.is_const(node):
            raise self.unsupported(f"the constant '{node.name}' (a parameter, buffer or a value computed from them) "
                                   "is used where a computed feature map is expected")
        return self.env[node] if isinstance(node, fx.Node) else node

    def emit(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """Emit one canonical call node carrying the current source node's provenance."""
        node = self.graph.call_function(target, args, kwargs or {})
        src = self.current
        node.meta.update(fxrel_kind=ops.OP_SPECS[target].kind, fxrel_module=module_path(src),
                         fxrel_source=source_line(src), fxrel_origin=str(src.target),
                         nn_module_stack=src.meta.get("nn_module_stack"))
        return node

    def unsupported(self, why: str) -> UnsupportedOpError:
        n = self.current
        return UnsupportedOpError(
            f"node '{n.name}' (target {n.target}, module '{module_path(n)}') is not in fxrel's canonical op set: "
            f"{why}\n  source: {source_line(n)}")

    # -- the walk -------------------------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.src.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                new = self.graph.placeholder(node.target)
                new.meta["fxrel_kind"] = ops.INPUT
                self.env[node] = new
            elif node.op == "get_attr":
                self.consts[node] = getattr(self.src, node.target)  # resolved by handlers through const()
            elif node.op == "output":
                out = self.graph.output(self.value(node.args[0]))
                out.meta["fxrel_kind"] = ops.OUTPUT
            elif node.op == "call_function":
                if self.fold(node):
                    continue
                handler = HANDLERS.get(node.target)
                if handler is None:
                    raise self.unsupported("no canonicalisation rule for this op")
                self.env[node] = handler(self, node)
            else:
                raise self.unsupported(f"unexpected fx op '{node.op}'")
        gm = fx.GraphModule(self.root, self.graph, self.src.__class__.__name__)
        return gm


def _is_tensors(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)


# --- handlers ----------------------------------------------------------------------------------------------------
@handles(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
def _conv(c: _Canonicalizer, n: fx.Node):
    x, w, b = n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    weight = c.const(w)
    dims = weight.dim() - 2
    if n.target is aten.convolution.default:
        _, _, _, stride, padding, dilation, transposed, output_padding, groups = n.args
        if transposed:
            raise c.unsupported("transposed convolution")
    else:
        names = ("stride", "padding", "dilation", "groups")
        given = dict(zip(names, n.args[3:]), **n.kwargs)
        stride, padding = given.get("stride", [1] * dims), given.get("padding", [0] * dims)
        dilation, groups = given.get("dilation", [1] * dims), given.get("groups", 1)
    if isinstance(padding, str):
        raise c.unsupported(f"string padding '{padding}'")

    def expand(v: Any) -> list:
        return list(v) * dims if len(v) == 1 else list(v)
    return c.emit(aten.convolution.default,
                  (c.value(x), c.param(weight, "weight"), c.param(c.const(b), "bias"), expand(stride),
                   expand(padding), expand(dilation), False, [0] * dims, groups))


@handles(aten.linear.default)
def _linear(c: _Canonicalizer, n: fx.Node):
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
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
    if n.target in ops.SHAPE_OPS and _pending(c, n.args[0]) is not None:   # a statistic reshaped for a division
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
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
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
    dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % len(x.meta["val"].shape)
    return tuple(c.emit(aten.squeeze.dim, (_slice_node(c, x, dim, i, i + 1), dim))
                 for i in range(x.meta["val"].shape[dim]))


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
    if _pending(c, n.args[0]) is not None:
        return _reshaped(c, n)
    if not n.users or any(u.target is not aten.mul.Tensor for u in n.users):
        raise c.unsupported("expand whose result is used other than in a product with a feature map")
    return c.value(n.args[0])


def _operand(c: _Canonicalizer, node: Any, like: fx.Node) -> torch.Tensor | None:
    """A constant operand (a Python number, a parameter or a folded constant) as a tensor in ``like``'s dtype, or
    ``None`` for a computed tensor."""
    if isinstance(node, fx.Node) and not c.is_const(node):
        return None
    dtype = like.meta["val"].dtype
    return c.const(node).to(dtype) if isinstance(node, fx.Node) else torch.tensor(node, dtype=dtype)


def _affine(c: _Canonicalizer, x: fx.Node, scale: torch.Tensor | None, shift: torch.Tensor | None):
    """``x·scale + shift`` with constant ``scale``/``shift`` as a canonical ``channel_affine`` (layer scale, NFNet's
    α/β gains, ``x + 0``); an identity is dropped."""
    if shift is not None and not bool((shift != 0).any()):
        shift = None
    if scale is None or (scale.numel() == 1 and float(scale) == 1.0):
        if shift is None:
            return c.value(x)
        scale = torch.ones((), dtype=shift.dtype)
    return c.emit(ops.channel_affine, (c.value(x), c.param(scale, "scale"), c.param(shift, "shift")))


@handles(aten.mul.Tensor, aten.div.Tensor)
def _mul(c: _Canonicalizer, n: fx.Node):
    """A product with a constant is an affine (``x·s``, ``x/s``); a feature map times a broadcast gate
    (squeeze-excitation) is ``channel_gate(value, gate)``."""
    a, b = n.args[:2]
    if n.target is aten.div.Tensor and _pending(c, a) is not None and _pending(c, b) is not None:
        return _response_scale(c, _pending(c, a), _pending(c, b))
    if n.target is aten.div.Tensor and _pending(c, b) is not None and _pending(c, b).root:
        return _divided_by_std(c, a, _pending(c, b))
    if n.target is aten.div.Tensor:
        divisor = _operand(c, b, n)
        if divisor is None or _operand(c, a, n) is not None or n.kwargs.get("rounding_mode"):
            raise c.unsupported("division by a computed tensor (only division by a constant is canonical)")
        return _affine(c, a, 1 / divisor, None)
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
    else:
        raise c.unsupported(f"product of tensors shaped {tuple(sa)} and {tuple(sb)} (only a feature map times a "
                            "gate broadcast over some of its dims, or times a same-shaped sigmoid/softmax gate, "
                            "is canonical)")
    return c.emit(ops.channel_gate, (c.value(value), c.value(gate)))


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


@handles(aten.stack.default)
def _stack(c: _Canonicalizer, n: fx.Node):
    """``stack`` = ``unsqueeze`` of each tensor, then ``cat`` (SKNet's branches)."""
    tensors = n.args[0]
    dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % (len(tensors[0].meta["val"].shape) + 1)
    if dim == 0:
        raise c.unsupported("stacking along the batch axis")
    return c.emit(aten.cat.default, ([c.emit(aten.unsqueeze.default, (c.value(t), dim)) for t in tensors], dim))


def _spatial_sum(c: _Canonicalizer, x: fx.Node, dims: list[int], keepdim: bool, count: int,
                 dtype: torch.dtype) -> fx.Node:
    """A sum over spatial dims as their mean (a canonical average pooling) times their size ``count``."""
    mean = c.emit(aten.mean.dim, (x, dims, keepdim))
    return c.emit(ops.channel_affine, (mean, c.param(torch.tensor(float(count), dtype=dtype), "scale"), None))


@handles(aten.sum.dim_IntList)
def _sum(c: _Canonicalizer, n: fx.Node):
    """A sum over spatial axes is a mean times their size; over a short non-batch axis (SKNet's branch axis), the
    sum of its slices."""
    x, dims = n.args[0], n.args[1]
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    shape = x.meta["val"].shape
    dims = sorted({d % len(shape) for d in (dims or range(len(shape)))})
    if n.kwargs.get("dtype") is not None:
        raise c.unsupported("sum with a dtype conversion")
    if ops.is_spatial_mean(dims, len(shape)):
        return _spatial_sum(c, c.value(x), dims, keepdim, math.prod(shape[d] for d in dims), x.meta["val"].dtype)
    if len(dims) != 1 or dims[0] == 0 or shape[dims[0]] > 16:
        raise c.unsupported(f"sum over dims {dims} of a tensor shaped {tuple(shape)} (spatial sums and sums over a "
                            "non-batch axis of ≤ 16 entries are canonical)")
    dim = dims[0]
    parts = [c.emit(aten.slice.Tensor, (c.value(x), dim, i, i + 1, 1)) for i in range(shape[dim])]
    if not keepdim:
        parts = [c.emit(aten.squeeze.dim, (p, dim)) for p in parts]
    total = parts[0]
    for part in parts[1:]:
        total = c.emit(aten.add.Tensor, (total, part))
    return total


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


@handles(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)
def _upsample(c: _Canonicalizer, n: fx.Node):
    return c.emit(n.target, (c.value(n.args[0]), *n.args[1:]))


@dataclass(frozen=True)
class _Pending:
    """Part of a hand-written normaliser, ``rsqrt(mean(x²) + ε)`` or ``rsqrt(var(x) + ε)`` (timm's RmsNorm2d,
    SimpleNorm), or ``‖x‖ / (mean_c ‖x‖ + ε)`` (GlobalResponseNorm): nothing is emitted until ``rsqrt`` (or the
    division) closes the pattern as one ``inv_std`` (``response_scale``) statistic."""

    x: fx.Node
    dims: tuple[int, ...] = ()
    squared: bool = False              #: x² not yet averaged
    correction: int | None = None      #: a variance with this correction (None: a mean of squares)
    eps: float = 0.0
    norm: bool = False                 #: ‖x‖₂ over ``dims`` (ConvNeXt-V2's GRN), awaiting ``/ (mean_c ‖x‖ + ε)``
    channel_dims: tuple[int, ...] = () #: the mean of that norm, over these dims
    root: bool = False                 #: ``sqrt(var(x) + ε)``, awaiting ``value / ·`` (EvoNorm's group std)
    view: tuple[int, ...] | None = None  #: the shape it was expanded and reshaped to for that division


def _pending(c: _Canonicalizer, node: Any) -> _Pending | None:
    value = c.env.get(node) if isinstance(node, fx.Node) else None
    return value if isinstance(value, _Pending) else None


@handles(aten.pow.Tensor_Scalar)
def _pow(c: _Canonicalizer, n: fx.Node):
    if n.args[1] != 2:
        raise c.unsupported(f"power {n.args[1]} (only the square inside a normaliser's rsqrt(mean(x²) + ε) is "
                            "canonical)")
    c.value(n.args[0])
    return _Pending(n.args[0], squared=True)


@handles(aten.var.dim, aten.var.correction)
def _var(c: _Canonicalizer, n: fx.Node):
    x, dims = n.args[0], n.args[1]
    if n.target is aten.var.dim:
        correction = int(n.args[2] if len(n.args) > 2 else n.kwargs.get("unbiased", True))
        keepdim = n.args[3] if len(n.args) > 3 else n.kwargs.get("keepdim", False)
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
    keepdim = n.args[3] if len(n.args) > 3 else n.kwargs.get("keepdim", False)
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
    return replace(_pending(c, n.args[0]), view=tuple(n.meta["val"].shape))


@handles(aten.sqrt.default)
def _sqrt(c: _Canonicalizer, n: fx.Node):
    pending = _pending(c, n.args[0])
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


@handles(aten._to_copy.default)
def _to_copy(c: _Canonicalizer, n: fx.Node):
    """A floating-point dtype cast (EvoNorm's float32 statistics): the canonical graph keeps the input's dtype."""
    dtype = n.kwargs.get("dtype")
    if set(n.kwargs) - {"dtype", "layout", "device", "memory_format"} or (dtype is not None
                                                                          and not dtype.is_floating_point):
        raise c.unsupported(f"copy with {n.kwargs} (only floating-point dtype casts are canonical)")
    return _pending(c, n.args[0]) or c.value(n.args[0])


@handles(aten.addcmul.default)
def _addcmul(c: _Canonicalizer, n: fx.Node):
    """``a + value·b·t`` with constants ``a``, ``b`` and a computed ``t`` (GRN's affine): an affine of ``t``."""
    a, b, t = n.args[:3]
    value = n.kwargs.get("value", 1)
    shift, scale = _operand(c, a, n), _operand(c, b, n)
    if shift is None or scale is None or _operand(c, t, n) is not None:
        raise c.unsupported("addcmul of computed tensors (only constant + constant·tensor is canonical)")
    return _affine(c, t, scale * value, shift)


@handles(aten.rsqrt.default)
def _rsqrt(c: _Canonicalizer, n: fx.Node):
    pending = _pending(c, n.args[0])
    if pending is None or pending.squared or pending.root or pending.norm:
        raise c.unsupported("rsqrt of something other than a normaliser's mean(x²) + ε or var(x) + ε")
    args = (c.value(pending.x), list(pending.dims), pending.eps)
    return c.emit(ops.inv_std, args if pending.correction is None else (*args, pending.correction))


@handles(aten.mean.dim)
def _mean(c: _Canonicalizer, n: fx.Node):
    rank = len(n.args[0].meta["val"].shape)
    pending = _pending(c, n.args[0])
    if pending is not None and pending.norm:
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if not keepdim:
            raise c.unsupported("mean of a norm without keepdim")
        return _Pending(pending.x, pending.dims, norm=True, channel_dims=tuple(d % rank for d in n.args[1]))
    if pending is not None and pending.squared:
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if not keepdim:
            raise c.unsupported("mean of squares without keepdim (only rsqrt(mean(x², keepdim=True) + ε) is canonical)")
        return _Pending(pending.x, tuple(d % rank for d in n.args[1]))
    if not ops.is_spatial_mean(n.args[1], rank):
        raise c.unsupported(f"mean over dims {n.args[1]} (only spatial means are canonical)")
    return _passthrough(c, n)


@handles(aten.add.Tensor, aten.sub.Tensor)
def _add(c: _Canonicalizer, n: fx.Node):
    """A sum of two computed tensors (residual connections); a constant added or subtracted is an affine shift."""
    a, b = n.args[:2]
    alpha = n.kwargs.get("alpha", 1)
    sign = -1 if n.target is aten.sub.Tensor else 1
    pending = _pending(c, a)
    if pending is not None and not (pending.squared or pending.root) and sign == 1 and isinstance(b, (int, float)):
        return replace(pending, eps=pending.eps + b)
    ca, cb = _operand(c, a, n), _operand(c, b, n)
    if ca is None and cb is None:
        if alpha != 1 or sign != 1:
            raise c.unsupported("difference or alpha≠1 of two computed tensors (only sums are canonical)")
        return c.emit(aten.add.Tensor, (c.value(a), c.value(b)))
    if ca is not None and cb is not None:
        raise c.unsupported("sum of two constants that was not folded")
    if cb is not None:
        return _affine(c, a, None, cb * (sign * alpha))
    return _affine(c, b, torch.tensor(float(sign * alpha), dtype=ca.dtype), ca)


@handles(aten.pad.default, aten.constant_pad_nd.default)
def _pad(c: _Canonicalizer, n: fx.Node):
    mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
    value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", 0.0)
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


@handles(aten.dropout.default, aten.detach.default, aten.lift_fresh_copy.default)
def _identity(c: _Canonicalizer, n: fx.Node):
    if n.target is aten.dropout.default and n.args[2]:
        raise c.unsupported("dropout in training mode")
    return c.value(n.args[0])


@handles(torch._assert, aten._assert_async.msg, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
         aten._assert_tensor_metadata.default)
def _drop(c: _Canonicalizer, n: fx.Node):
    return None


# --- folding -----------------------------------------------------------------------------------------------------
def _per_channel(value: torch.Tensor, channels: int, rank: int) -> torch.Tensor | None:
    """``value`` as a ``[channels]`` vector when it broadcasts over a layer's output only along the channel axis
    (dim 1 of a conv output, the last dim of a linear one, or a scalar); else None."""
    if value.numel() == 1:
        return value.reshape(1).expand(channels).clone()
    dims = [d for d, size in enumerate(value.shape, start=rank - value.dim()) if size != 1]
    return value.flatten() if value.numel() == channels and len(dims) == 1 and dims[0] in (1, rank - 1) else None


def fold_affine(gm: fx.GraphModule) -> int:
    """Fold every per-channel affine into the conv/linear directly before it; return how many were folded.

    ``affine(conv(x; W, b); s, t) = conv(x; W·s, b·s + t)`` when the conv's output is used only by the affine.
    """
    folded = 0
    for node in list(gm.graph.nodes):
        if node.meta.get("fxrel_kind") != ops.AFFINE:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.meta.get("fxrel_kind") in (ops.CONV, ops.LINEAR)
                and len(prev.users) == 1):
            continue
        w_node, b_node = prev.args[1], prev.args[2]
        weight = getattr(gm, w_node.target)
        channels = weight.shape[0]
        rank = len(prev.meta["val"].shape) if "val" in prev.meta else weight.dim()
        scale = _per_channel(getattr(gm, node.args[1].target), channels, rank)
        shift = (_per_channel(getattr(gm, node.args[2].target), channels, rank) if node.args[2] is not None
                 else torch.zeros_like(scale))
        if scale is None or shift is None:
            continue  # an affine over other axes than the layer's output channels; keep it
        bias = getattr(gm, b_node.target) if b_node is not None else torch.zeros_like(shift)
        new_w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        new_b = bias * scale + shift
        setattr(gm, w_node.target, new_w)
        if b_node is None:
            gm.register_buffer(f"{w_node.target}_bias", new_b, persistent=False)
            with gm.graph.inserting_before(prev):
                b_node = gm.graph.get_attr(f"{w_node.target}_bias")
            b_node.meta["fxrel_kind"] = ops.PARAM
            prev.args = (prev.args[0], w_node, b_node, *prev.args[3:])
        else:
            setattr(gm, b_node.target, new_b)
        prev.meta.setdefault("fxrel_folded", []).append(node.meta.get("fxrel_module") or node.name)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


_NONNEGATIVE_ACTIVATIONS = (aten.relu.default, aten.sigmoid.default, aten.hardsigmoid.default)
_SIGN_PRESERVING = (ops.MAXPOOL, ops.AVGPOOL, ops.SHAPE, ops.PAD, ops.CAT, ops.ADD)


def mark_nonnegative(gm: fx.GraphModule) -> None:
    """Set ``node.meta['fxrel_nonnegative']`` where a node's output is ≥ 0 for every input, by construction:
    ReLU-like activations, and pooling/shape/concat/sum ops whose tensor inputs are all non-negative. Rules use
    it to skip terms that are identically zero (the ``x⁻`` half of z⁺/αβ/γ after a ReLU)."""
    for node in gm.graph.nodes:
        kind = node.meta.get("fxrel_kind")
        if kind == ops.ACTIVATION:
            lower = node.args[1] if node.target is aten.hardtanh.default and len(node.args) > 1 else None
            value = node.target in _NONNEGATIVE_ACTIVATIONS or (lower is not None and lower >= 0)
        elif node.target is aten.constant_pad_nd.default and node.args[2] < 0:  # −∞ padding before a max-pool
            value = False
        elif kind in _SIGN_PRESERVING:
            value = all(a.meta.get("fxrel_nonnegative", False) for a in ops.tensor_inputs(node))
        else:
            value = False
        node.meta["fxrel_nonnegative"] = value


def canonicalize(captured: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
                 fold_batchnorm: bool = True) -> fx.GraphModule:
    """Map a captured graph onto the canonical op set, fold BatchNorm, and annotate every node's shape and sign."""
    gm = _Canonicalizer(captured).run()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if fold_batchnorm:
        fold_affine(gm)
    ShapeProp(gm).propagate(*example_inputs)
    mark_nonnegative(gm)
    return gm
