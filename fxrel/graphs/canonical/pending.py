"""The state of a normalising statistic being recognised (:class:`_Pending`), shared by the walker and handlers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx


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
    floor: float | None = None         #: ``max(‖x‖, floor)`` (``F.normalize``), awaiting ``value / ·``
    root: bool = False                 #: ``sqrt(var(x) + ε)``, awaiting ``value / ·`` (EvoNorm's group std)
    view: tuple[int, ...] | None = None  #: the shape it was expanded and reshaped to for that division


@dataclass(frozen=True)
class _Logits:
    """Attention logits ``q @ kᵀ`` written out (LeViT, CaiT, Swin without fused attention), being followed to their
    softmax: a constant scale (``· s``, ``/ s``) and additive constants (position biases, window masks) are collected,
    through reshapes (``shape``: the logits' current shape; ``bias`` broadcasts to it); nothing is emitted until the
    softmax closes them as one ``attention_weights``."""

    q: fx.Node                         #: canonical node of q, [..., Q, d]
    kt: fx.Node                        #: canonical node of kᵀ, [..., d, K]
    shape: tuple[int, ...]
    base: tuple[int, ...]              #: the shape of q @ kᵀ itself
    scale: torch.Tensor | float = 1.0  #: broadcasts to ``base``
    bias: torch.Tensor | None = None   #: broadcasts to ``shape``
