"""Passes over a canonical graph: folding per-channel affines into the layer before them, and sign annotation."""
from __future__ import annotations

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.graphs.ops import aten


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


_NONNEGATIVE_ACTIVATIONS = (aten.relu.default, aten.sigmoid.default, aten.hardsigmoid.default, aten.pow.Tensor_Scalar)
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
        elif node.target in (ops.with_tokens, aten.upsample_bicubic2d.vec):   # signed tokens, bicubic overshoot
            value = False
        elif kind in _SIGN_PRESERVING:
            value = all(a.meta.get("fxrel_nonnegative", False) for a in ops.tensor_inputs(node))
        else:
            value = False
        node.meta["fxrel_nonnegative"] = value
