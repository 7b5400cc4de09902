"""Complexity metrics: how concentrated is an attribution?"""
from __future__ import annotations

import torch
from torch import Tensor

from fxrel.metrics.localisation import _check_maps


def sparseness(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Sparseness: the Gini index of ``|M|`` (Chalasani et al., ICML 2020, "Concise explanations of neural
    networks using adversarial training"). Higher ↑ (more concentrated).

    With ``a = |M| / max|M| + eps`` sorted ascending over the ``n = H·W`` pixels,
    ``G = Σ_i (2i − n − 1) a_(i) / (n Σ_i a_i)`` — quantus's ``Sparseness`` with its per-sample max-normalisation
    and ``eps = 1e-7``. An all-zero map is uniform: 0. Uniform map → 0, one-hot → (1 − 1/n)/(1 + n·eps).
    """
    a = _check_maps(maps).abs().flatten(1)
    peak = a.amax(1, keepdim=True)
    a = a / peak.where(peak > 0, torch.ones_like(peak)) + eps
    a = a.sort(1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = n * a.sum(1)
    gini = ((2 * i - n - 1) * a).sum(1) / total.where(total > 0, torch.ones_like(total))
    return gini.where(total > 0, torch.zeros_like(total))
