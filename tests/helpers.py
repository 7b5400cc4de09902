"""Reference computations for the tests (autograd, relative errors)."""
from __future__ import annotations

import torch
from torch import nn


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


def assert_exact_and_conserving(net: nn.Module, x: torch.Tensor, targets: torch.Tensor, *, gradient_tol: float = 1e-12,
                                rtol: float = 1e-10, atol: float = 0.0) -> None:
    """The ``gradient`` rule set equals autograd (relative ``gradient_tol``), and LRP-0 (CP-LRP at attention) on the
    copy with every additive constant removed sums to that copy's target logits (``rtol``)."""
    import fxrel
    from fxrel.coverage import constant_free

    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) \
        < gradient_tol
    bare = constant_free(net)
    with torch.no_grad():
        logits = bare(x).gather(1, targets[:, None]).squeeze(1)
    relevance = fxrel.Explainer(bare, "lrp_0", attention="cp")(x, targets)   # CP-LRP: the conserving attention rule
    assert torch.allclose(relevance.flatten(1).sum(1), logits, rtol=rtol, atol=atol)


def random_targets(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        classes = model(x).shape[1]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(classes, (len(x),), generator=g)


def two_objects() -> tuple[nn.Module, torch.Tensor]:
    """A red square on the left (object A) and a green one on the right (object B) of an 8×16 image. conv1 detects
    red and green (3×3 means), conv2 smooths each, global pooling and y_A = red − 0.2·green, y_B = green − 0.2·red:
    class A responds to the left object, class B to the right one, each slightly inhibited by the other."""
    conv1, conv2, head = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv1.weight.zero_(), conv1.bias.zero_(), conv2.weight.zero_(), conv2.bias.zero_()
        for c in range(2):
            conv1.weight[c, c] = 1 / 9
            conv2.weight[c, c] = 0.05
            conv2.weight[c, c, 1, 1] = 1.0
        head.weight.copy_(torch.tensor([[1.0, -0.2], [-0.2, 1.0]]))
    model = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = torch.zeros(1, 3, 8, 16)
    x[:, 0, 2:6, 2:6] = 1.0
    x[:, 1, 2:6, 10:14] = 1.0
    return model.eval().double(), x.double()


def object_masses(r: torch.Tensor) -> tuple[float, float, float]:
    """Relevance summed over channels on object A, on object B, and the positive share that lies on A."""
    heat = r.sum(1)[0]
    on_a, on_b = heat[2:6, 2:6].sum().item(), heat[2:6, 10:14].sum().item()
    return on_a, on_b, (heat.clamp(min=0)[:, :8].sum() / heat.clamp(min=0).sum()).item()
