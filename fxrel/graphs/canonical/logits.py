"""Attention logits written out (:class:`~fxrel.graphs.canonical.pending._Logits`): scaled, shifted by constants
and reshaped on their way to the softmax that closes them (:mod:`~fxrel.graphs.canonical.gates`)."""
from __future__ import annotations

from dataclasses import replace

import torch

from fxrel.graphs.canonical.pending import _Logits
from fxrel.graphs.canonical.walker import _Canonicalizer


def scaled_logits(c: _Canonicalizer, logits: _Logits, factor: torch.Tensor) -> _Logits:
    """The logits times a constant (``· s``, ``/ s``): the scale and the biases collected so far scale with it."""
    if logits.shape != logits.base and factor.numel() > 1:
        raise c.unsupported("attention logits reshaped and then scaled by a tensor")
    bias = None if logits.bias is None else logits.bias * factor
    return replace(logits, scale=logits.scale * factor, bias=bias)


def shifted_logits(c: _Canonicalizer, logits: _Logits, shift: torch.Tensor) -> _Logits:
    """The logits plus a constant (a relative position bias, a window mask)."""
    return replace(logits, bias=shift if logits.bias is None else logits.bias + shift)


def reshaped_logits(c: _Canonicalizer, logits: _Logits, shape: tuple[int, ...]) -> _Logits:
    """The logits viewed in another shape that keeps the keys last (Swin's ``[N·windows, …] → [N, windows, …]``
    to add its mask)."""
    bias = None if logits.bias is None else logits.bias.expand(logits.shape).reshape(shape)
    return replace(logits, shape=tuple(shape), bias=bias)
