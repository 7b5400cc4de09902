"""Handlers that move values without arithmetic: ops kept as they are (activations, shape ops, pooling, ``cat``),
``getitem``, slicing (``slice``/``split``/``unbind``), ``stack``, padding, upsampling, and the no-ops that are dropped
(dtype casts, eval-mode dropout, detaches, asserts)."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.canonical.logits import reshaped_logits
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
         aten.adaptive_avg_pool2d.default)
def _passthrough(c: _Canonicalizer, n: fx.Node):
    if n.target in ops.SHAPE_OPS and c.pending(n.args[0]) is not None:   # a statistic reshaped for a division
        return _reshaped(c, n)
    logits = c.logits(n.args[0])
    if (logits is not None and n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
            and n.meta["val"].shape[-1] == logits.base[-1]):   # attention logits reshaped on their way to softmax
        return reshaped_logits(c, logits, tuple(n.meta["val"].shape))
    # views become reshapes: canonical ops may lay their outputs out differently from the ATen ones they replace
    # (attention's output is contiguous in [N, heads, tokens, d], SDPA's in [N, tokens, heads, d])
    target = aten.reshape.default if n.target in (aten.view.default, aten._unsafe_view.default) else n.target
    args = tuple([c.value(a) for a in n.args[0]] if i == 0 and isinstance(n.args[0], (list, tuple)) else c.value(a)
                 for i, a in enumerate(n.args))
    return c.emit(target, args, dict(n.kwargs))


def _slice_node(c: _Canonicalizer, x: fx.Node, dim: int, start: int, end: int, step: int = 1) -> fx.Node:
    """A canonical slice (one that would mix samples is refused by
    :func:`~fxrel.graphs.canonical.batch_axis.mark_batch_axis`, which knows where the batch axis is)."""
    return c.emit(aten.slice.Tensor, (c.value(x), dim, start, end, step))


@handles(aten.slice.Tensor)
def _slice(c: _Canonicalizer, n: fx.Node):
    """``x[..., start:end:step]`` along one dim (bounds normalised to ``0 ≤ start ≤ end ≤ size``; EVA's rotary
    embedding takes the even and odd channels, LeViT's subsampling every other token)."""
    x, dim, start, end, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1:])[:5]
    shape = x.meta["val"].shape
    dim %= len(shape)
    size = shape[dim]
    if step < 1:
        raise c.unsupported(f"slice with step {step}")

    def bound(v: int | None, default: int) -> int:
        v = default if v is None else v
        return min(max(v + size if v < 0 else v, 0), size)

    start = bound(start, 0)
    return _slice_node(c, x, dim, start, max(bound(end, size), start), step)


@handles(aten.flip.default)
def _flip(c: _Canonicalizer, n: fx.Node):
    """``flip`` along given dims: a permutation of the entries, a shape op."""
    return c.emit(aten.flip.default, (c.value(n.args[0]), [d % len(n.meta["val"].shape) for d in n.args[1]]))


@handles(aten.roll.default)
def _roll(c: _Canonicalizer, n: fx.Node):
    """``roll`` (Swin's shifted windows): a permutation of the entries, a shape op."""
    x, shifts = n.args[0], list(n.args[1])
    dims = list(n.args[2]) if len(n.args) > 2 else list(ops.argument(n, "dims", []))
    if not dims:
        raise c.unsupported("roll of the flattened tensor (only a roll along given dims is canonical)")
    return c.emit(aten.roll.default, (c.value(x), shifts, dims))


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


def _pick(c: _Canonicalizer, x: fx.Node, dim: int, index: int) -> fx.Node:
    """``x.select(dim, index)`` as a canonical slice and squeeze."""
    return c.emit(aten.squeeze.dim, (_slice_node(c, x, dim, index, index + 1), dim))


@handles(aten.unbind.int)
def _unbind(c: _Canonicalizer, n: fx.Node):
    """``unbind``: one squeezed canonical slice per index (``getitem`` picks them; attention's q, k, v)."""
    x = n.args[0]
    dim = ops.argument(n, "dim", 0) % len(x.meta["val"].shape)
    return tuple(_pick(c, x, dim, i) for i in range(x.meta["val"].shape[dim]))


@handles(aten.select.int)
def _select(c: _Canonicalizer, n: fx.Node):
    """``x.select(dim, index)`` (``x[:, 0]``: a class token's features): a squeezed canonical slice."""
    x, dim, index = n.args
    shape = x.meta["val"].shape
    dim %= len(shape)
    return _pick(c, x, dim, index % shape[dim])


@handles(aten.cat.default)
def _cat(c: _Canonicalizer, n: fx.Node):
    """Concatenation of computed tensors; constants among them (a transformer's class, distillation and register
    tokens, expanded over the batch) become ``with_tokens`` of the computed tensor they precede (or the last one
    they follow)."""
    tensors, dim = list(n.args[0]), ops.argument(n, "dim", 0) % len(n.meta["val"].shape)
    computed = [i for i, t in enumerate(tensors) if not c.is_const(t)]
    if not computed:
        raise c.unsupported("concatenation of constants that was not folded")
    if len(computed) == len(tensors):
        return c.emit(aten.cat.default, ([c.value(t) for t in tensors], dim))

    def tokens(parts: list) -> fx.Node | None:
        if not parts:
            return None
        value = torch.cat([c.const(t) for t in parts], dim)
        if dim == 0:   # concatenated along axis 0 (sequence-first tokens): kept whole, as ops.with_tokens expects
            return c.param(value.detach().clone(), "tokens")
        if not bool((value == value[:1]).all()):
            raise c.unsupported("a concatenated constant that differs along the batch axis")
        return c.param(value[:1].detach().clone(), "tokens")   # batch size 1, expanded to the input's

    pieces, start = [], 0
    for k, i in enumerate(computed):
        end = len(tensors) if k == len(computed) - 1 else i + 1
        before, after = tokens(tensors[start:i]), tokens(tensors[i + 1:end])
        value = c.value(tensors[i])
        pieces.append(value if before is None and after is None else
                      c.emit(ops.with_tokens, (value, before, after, dim)))
        start = end
    return pieces[0] if len(pieces) == 1 else c.emit(aten.cat.default, (pieces, dim))


@handles(aten.stack.default)
def _stack(c: _Canonicalizer, n: fx.Node):
    """``stack`` = ``unsqueeze`` of each tensor, then ``cat`` (SKNet's branches)."""
    tensors = n.args[0]
    dim = ops.argument(n, "dim", 0) % (len(tensors[0].meta["val"].shape) + 1)
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
    if mode == "constant" and math.isfinite(value) and value != 0.0 and all(p >= 0 for p in pads):
        return _padded_with(c, n, pads, value)
    if mode != "constant" or not (value == 0.0 or (value == -math.inf and pooled)):
        raise c.unsupported(f"padding mode={mode} value={value} (constant padding with a finite value or "
                            "cropping, −∞ padding before max-pooling (TF 'SAME') and 2-D reflect/replicate padding "
                            "are canonical)")
    return c.emit(aten.constant_pad_nd.default, (c.value(n.args[0]), pads, value))


def _padded_with(c: _Canonicalizer, n: fx.Node, pads: list[int], value: float) -> fx.Node:
    """Padding with a constant ``value ≠ 0`` (EfficientViT pads its values with a column of ones, the linear
    attention's normaliser): zero padding plus a constant shift that is ``value`` on the padded entries only, an
    additive constant the rules absorb as they absorb a bias. The shift has size 1 on every dim not padded, so it
    broadcasts over the batch."""
    x = n.args[0]
    shape = x.meta["val"].shape
    padded = {len(shape) - 1 - i // 2 for i, p in enumerate(pads) if p}
    core = torch.zeros([size if d in padded else 1 for d, size in enumerate(shape)], dtype=x.meta["val"].dtype)
    shift = torch.nn.functional.pad(core, pads, value=value)
    zero_padded = c.emit(aten.constant_pad_nd.default, (c.value(x), pads, 0.0))
    return c.emit(ops.channel_affine, (zero_padded, c.param(torch.ones((), dtype=shift.dtype), "scale"),
                                       c.param(shift, "shift")))


@handles(aten.amax.default)
def _amax(c: _Canonicalizer, n: fx.Node):
    """A maximum over dims (Hiera's mask-unit pooling, ``x.view(…).amax(1)``): winner-take-all, a max pooling."""
    x, dims = n.args[0], list(ops.argument(n, "dim", []))
    if not dims:
        raise c.unsupported("amax over every dim (only a maximum over given dims is canonical)")
    return c.emit(aten.amax.default, (c.value(x), dims, ops.argument(n, "keepdim", False)))


@handles(aten.index.Tensor)
def _index(c: _Canonicalizer, n: fx.Node):
    """``x[:, …, idx]`` with constant integer indices along one dim (CSATv2 reorders its DCT coefficients): each
    output a copy of the entry it names, an ``index_select`` (multi-dimensional indices flattened, then the result
    viewed in their shape)."""
    x, indices = n.args
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(given) != 1 or not c.is_const(given[0][1]) or c.const(given[0][1]).dtype not in (torch.int32, torch.int64):
        raise c.unsupported("indexing other than with one constant integer tensor along one dim")
    dim, index = given[0][0], c.const(given[0][1])
    taken = c.emit(aten.index_select.default, (c.value(x), dim, c.param(index.flatten().long(), "index")))
    if index.dim() == 1:
        return taken
    return c.emit(aten.reshape.default, (taken, list(n.meta["val"].shape)))


@handles(aten.max.dim)
def _max_dim(c: _Canonicalizer, n: fx.Node):
    """``x.max(dim)`` whose values alone are used (VOLO's token-labelling head takes the maximum over tokens): the
    maximum over that dim, an ``amax``; the indices are not canonical."""
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users):
        raise c.unsupported("max over a dim whose indices are used (only its values are canonical)")
    return (c.emit(aten.amax.default, (c.value(n.args[0]), [n.args[1]], ops.argument(n, "keepdim", False))),)


@handles(aten.avg_pool1d.default)
def _avg_pool1d(c: _Canonicalizer, n: fx.Node):
    """1-D average pooling (NextViT's token reduction) as a 2-D one over a unit height."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    a = {name: ops.argument(n, name, None) for name in names}
    kernel = list(a["kernel_size"])
    stride, padding = list(a["stride"] or kernel), list(a["padding"] or [0])
    wide = c.emit(aten.unsqueeze.default, (c.value(n.args[0]), -2))
    pooled = c.emit(aten.avg_pool2d.default, (wide, [1, *kernel], [1, *stride], [0, *padding],
                                              bool(a["ceil_mode"]), a["count_include_pad"] is not False))
    return c.emit(aten.squeeze.dim, (pooled, -2))


@handles(aten.im2col.default)
def _unfold(c: _Canonicalizer, n: fx.Node):
    """``F.unfold`` (TNT's and VOLO's local patches): a copying op, each output a pixel of a patch or zero padding."""
    x, kernel, dilation, padding, stride = n.args
    return c.emit(aten.im2col.default, (c.value(x), list(kernel), list(dilation), list(padding), list(stride)))


@handles(aten.col2im.default)
def _fold(c: _Canonicalizer, n: fx.Node):
    """``F.fold`` (VOLO's outlook attention puts its weighted patches back): each pixel the sum of the patch entries
    that cover it, a linear map with unit taps (a sum pooling)."""
    x, size, kernel, dilation, padding, stride = n.args
    return c.emit(aten.col2im.default, (c.value(x), list(size), list(kernel), list(dilation), list(padding),
                                        list(stride)))


@handles(aten.repeat_interleave.self_int)
def _repeat_interleave(c: _Canonicalizer, n: fx.Node):
    """``x.repeat_interleave(r, dim)`` (GCViT repeats its global query per window): a copying op."""
    x, repeats = n.args[:2]
    dim = ops.argument(n, "dim", None)
    if dim is None or ops.argument(n, "output_size", None) not in (None, n.meta["val"].shape[dim]):
        raise c.unsupported("repeat_interleave of the flattened tensor (only along a given dim is canonical)")
    return c.emit(aten.repeat_interleave.self_int, (c.value(x), repeats, dim % len(n.meta["val"].shape)))


@handles(aten.unfold.default)
def _sliding_windows(c: _Canonicalizer, n: fx.Node):
    """``x.unfold(dim, size, step)`` (the HaloNets' overlapping key/value blocks): a copying op, the windows along
    ``dim`` as a new last dim."""
    x, dim, size, step = n.args
    return c.emit(aten.unfold.default, (c.value(x), dim % x.meta["val"].dim(), size, step))


@handles(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_bicubic2d.vec)
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


@handles(aten.type_as.default)
def _type_as(c: _Canonicalizer, n: fx.Node):
    """``x.type_as(other)`` to a floating-point dtype (EVA's rotary embedding): dropped like a dtype cast; of a
    constant (differential attention's λ), the constant cast — ``other`` gives only the dtype."""
    dtype = n.meta["val"].dtype
    if not dtype.is_floating_point:
        raise c.unsupported(f"type_as to {dtype} (only floating-point casts are canonical)")
    if c.is_const(n.args[0]):
        return c.folded(n, c.const(n.args[0]).to(dtype))
    return c.pending(n.args[0]) or c.value(n.args[0])


@handles(aten.copy.default)
def _copy(c: _Canonicalizer, n: fx.Node):
    """``dest.copy_(src)`` of the same shape (what functionalisation makes of ``attn[:, :, a:, b:] = …``, MViTv2's
    relative positions): the overwritten value is ``src``; the region written goes back by ``slice_scatter``."""
    dest, src = n.args[:2]
    if not isinstance(src, fx.Node) or src.meta["val"].shape != dest.meta["val"].shape:
        raise c.unsupported("copy_ of a broadcast or non-tensor source (only a same-shaped overwrite is canonical)")
    return c.pending(src) or c.value(src)


@handles(aten.slice_scatter.default)
def _slice_scatter(c: _Canonicalizer, n: fx.Node):
    """``dest`` with ``dest[start:end]`` along ``dim`` replaced by ``src`` (an in-place slice assignment,
    functionalised): the concatenation of ``dest``'s slices before and after with ``src`` (step 1)."""
    dest, src = n.args[:2]
    shape = dest.meta["val"].shape
    dim = ops.argument(n, "dim", 0) % len(shape)
    start, end = ops.argument(n, "start", None) or 0, ops.argument(n, "end", None)
    end = shape[dim] if end is None else min(end, shape[dim])
    start, end = start % shape[dim] if start < 0 else start, end % shape[dim] if end < 0 else end
    if ops.argument(n, "step", 1) != 1:
        raise c.unsupported("slice_scatter with a step (only contiguous slice assignments are canonical)")
    before = [c.emit(aten.slice.Tensor, (c.value(dest), dim, 0, start))] if start > 0 else []
    after = [c.emit(aten.slice.Tensor, (c.value(dest), dim, end, shape[dim]))] if end < shape[dim] else []
    parts = [*before, c.value(src), *after]
    return parts[0] if len(parts) == 1 else c.emit(aten.cat.default, (parts, dim))


@handles(aten.dropout.default, aten.detach.default, aten.lift_fresh_copy.default)
def _identity(c: _Canonicalizer, n: fx.Node):
    if n.target is aten.dropout.default and n.args[2]:
        raise c.unsupported("dropout in training mode")
    return c.value(n.args[0])


@handles(torch._assert, aten._assert_async.msg, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
         aten._assert_tensor_metadata.default)
def _drop(c: _Canonicalizer, n: fx.Node):
    return None
