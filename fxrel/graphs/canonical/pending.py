"""The state of a normalising statistic being recognised (:class:`_Pending`), shared by the walker and handlers."""
from __future__ import annotations

from dataclasses import dataclass

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
    root: bool = False                 #: ``sqrt(var(x) + ε)``, awaiting ``value / ·`` (EvoNorm's group std)
    view: tuple[int, ...] | None = None  #: the shape it was expanded and reshaped to for that division
