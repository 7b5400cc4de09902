"""Attribution-guided factorization F̄ (Gur, Ali, Wolf, AAAI 2021, Def. 3, Eq. 7 and 11; ``specs/agf.md`` §3).

A feature map ``Y ∈ ℝ^{C×H×W}`` is explained as a mix of two *representatives* — the mean activation pattern over
the foreground pixels (the attribution guide ``φ > 0``) and over the background pixels (``φ < 0``) — by least
squares per pixel; ``F̄ = w_fg − w_bg`` is high where a pixel looks like the foreground::

    Hm   = sigmoid(slope · Y / max Y)                     soft Heaviside step (max over C,H,W per sample)
    R_f  = Σ_hw Hm·1[φ>0] / #(φ>0),   R_b = Σ_hw Hm·1[φ<0] / #(φ<0)      per channel, 0 for an empty set
    R    = [R_b, R_f] ∈ ℝ^{C×2}
    W    = relu((RᵀR + λI)⁻¹ Rᵀ Hm)  ∈ ℝ^{2×HW}            ridge least squares (a 2×2 system, solved in closed form)
    F̄    = W_f − W_b,  shaped (1,H,W), broadcast over the channels

Defaults follow the official code (slope 10 with the max-normalisation, ridge ``λ = 1``, background ``φ < 0``);
``slope=None`` is the paper's plain ``sigmoid(Y)``, ``ridge=0`` its plain ``(RᵀR)⁻¹``, ``background="nonpositive"``
its ``φ ≤ 0``. Everything is batched over samples and written with plain tensor ops, so it records into relevance
graphs (fx proxies) and compiles. Degenerate inputs (an empty foreground or background, all-zero maps, a singular
system with ``λ = 0``) give finite output: empty sets and zero divisors contribute 0.
"""
from __future__ import annotations

from typing import Any

import torch

from fxrel.errors import RuleError
from fxrel.rules.generic import divide

BACKGROUNDS = ("negative", "nonpositive")


def max_normalize(t: Any) -> Any:
    """``t / max t`` per sample (the max over every non-batch axis; a zero max gives 0)."""
    flat = t.flatten(1)
    return divide(flat, flat.amax(1, keepdim=True), 0.0).view_as(t)


def soft_heaviside(values: Any, slope: float | None) -> Any:
    """``sigmoid(slope · Y / max Y)`` (official), or ``sigmoid(Y)`` for ``slope=None`` (the paper)."""
    if slope is None:
        return torch.sigmoid(values)
    return torch.sigmoid(slope * max_normalize(values))


def factorize(values: Any, guide: Any, slope: float | None = 10.0, ridge: float = 1.0,
              background: str = "negative") -> Any:
    """F̄(values; guide): ``values`` ``[N, C, H, W]``, ``guide`` φ ``[N, 1, H, W]``; returns ``[N, C, H, W]``
    (the same map on every channel). See the module docstring."""
    check_options(slope, ridge, background)
    heaviside = soft_heaviside(values, slope).flatten(2)                        # [N, C, HW]
    fg = (guide > 0).to(heaviside.dtype).flatten(2)                             # [N, 1, HW]
    bg = ((guide < 0) if background == "negative" else (guide <= 0)).to(heaviside.dtype).flatten(2)
    r_b = divide((heaviside * bg).sum(2), bg.sum(2), 0.0)                       # [N, C]
    r_f = divide((heaviside * fg).sum(2), fg.sum(2), 0.0)
    # normal equations of the 2×2 ridge problem: [[a, b], [b, d]] · W = [p; q]
    a = (r_b * r_b).sum(1, keepdim=True) + ridge                                # [N, 1]
    b = (r_b * r_f).sum(1, keepdim=True)
    d = (r_f * r_f).sum(1, keepdim=True) + ridge
    p = (r_b.unsqueeze(2) * heaviside).sum(1)                                   # [N, HW]
    q = (r_f.unsqueeze(2) * heaviside).sum(1)
    det = a * d - b * b
    w_b = divide(d * p - b * q, det, 0.0).clamp(min=0)
    w_f = divide(a * q - b * p, det, 0.0).clamp(min=0)
    return (w_f - w_b).view_as(guide).expand_as(values)


def check_options(slope: float | None, ridge: float, background: str) -> None:
    if background not in BACKGROUNDS:
        raise RuleError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if ridge < 0:
        raise RuleError(f"ridge must be ≥ 0, got {ridge}")
    if slope is not None and slope <= 0:
        raise RuleError(f"slope must be > 0 (or None for the paper's plain sigmoid), got {slope}")
