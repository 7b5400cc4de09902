"""Reference computations for the tests (autograd, relative errors)."""
from __future__ import annotations

import torch


def autograd_input_gradient(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂ y_t / ∂ x per row, with torch.autograd (the reference the gradient rule set must reproduce)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out[torch.arange(len(x)), targets].sum(), x)
    return grad


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both vanish)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def random_targets(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        classes = model(x).shape[1]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(classes, (len(x),), generator=g)
