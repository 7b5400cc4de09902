"""Robustness metrics: how much does an explanation change under small input perturbations?"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fxrel.errors import InputError
from fxrel.metrics.perturbation import _check_targets
from fxrel.streams import Key, draw_rows, row_generators

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _explain(explain_fn: ExplainFn, model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    """``explain_fn(model, x, targets)`` detached, after checking it is a finite ``[B, (C,) H, W]`` tensor."""
    e = explain_fn(model, x, targets)
    if not isinstance(e, Tensor) or e.dim() not in (3, 4) or e.shape[0] != x.shape[0] or e.shape[-2:] != x.shape[-2:]:
        raise InputError(f"explain_fn must return [B, H, W] or [B, C, H, W] for inputs {tuple(x.shape)}, "
                         f"got {getattr(e, 'shape', type(e).__name__)}")
    if not torch.isfinite(e).all():
        raise InputError("explain_fn returned NaN or inf values")
    return e.detach()


def max_sensitivity(explain_fn: ExplainFn, model: nn.Module, x: Tensor, targets: Tensor, radius: float = 0.2,
                    samples: int = 10, seed: int = 0, noise: Tensor | None = None,
                    keys: Sequence[Key] | Tensor | None = None) -> Tensor:
    """Max-sensitivity (Yeh et al., NeurIPS 2019, "On the (in)fidelity and sensitivity of explanations"). Lower ↓.

    ``max_{δ} ‖E(x + δ) − E(x)‖_F / ‖E(x)‖_F`` over ``samples`` draws of ``δ ~ U[−radius, radius]`` per input
    element (as quantus's ``MaxSensitivity``), on the explanation as ``explain_fn`` returns it; each draw
    perturbs and re-explains the whole batch at once. Row ``b``'s ``δ`` are the successive draws of its own stream
    keyed ``(seed, keys[b])`` (:mod:`fxrel.streams`; ``keys`` default: the row positions), so a row scores the same
    in any batch, process or device when it keeps its key. ``noise`` (``[samples, B, C, H, W]``) replaces the draws.
    A zero explanation scores 0 if it stays zero, inf otherwise.
    """
    targets, _ = _check_targets(model, x, targets)
    if noise is not None and tuple(noise.shape[1:]) != tuple(x.shape):
        raise InputError(f"noise must be [samples, *x.shape] = [S, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(noise.shape)}")
    if noise is None and samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    reference = _explain(explain_fn, model, x, targets).flatten(1)
    generators = row_generators(seed, "max_sensitivity", keys, len(x))
    worst = torch.zeros(len(x), dtype=reference.dtype, device=reference.device)
    for s in range(samples if noise is None else len(noise)):
        if noise is None:
            delta = (draw_rows(generators, x.shape[1:], dtype=x.dtype) * 2 - 1) * radius
        else:
            delta = noise[s]
        perturbed = _explain(explain_fn, model, x + delta.to(x), targets).flatten(1)
        worst = torch.maximum(worst, (perturbed - reference).norm(dim=1))
    norm = reference.norm(dim=1)
    ratio = worst / norm.where(norm > 0, torch.ones_like(norm))
    return torch.where(norm > 0, ratio, torch.where(worst > 0, torch.full_like(worst, float("inf")), ratio))
