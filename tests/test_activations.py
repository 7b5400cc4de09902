"""Every canonical activation's VJP equals autograd, at the kinks too (autograd's convention there), inside a conv
net and elementwise on inputs placed exactly on the breakpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrel
from tests.helpers import autograd_input_gradient, rel_error

ACTIVATIONS = {
    "relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(-0.5, 2.0), "leaky_relu": nn.LeakyReLU(0.1),
    "elu": nn.ELU(0.7), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "silu": nn.SiLU(), "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU("tanh"), "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "mish": nn.Mish(),
}
KINKS = torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 6.0, -6.0, 4.5], dtype=torch.float64)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradient_through_the_activation_equals_autograd(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ACTIVATIONS[name], nn.Conv2d(4, 4, 3), ACTIVATIONS[name],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 3
    targets = torch.tensor([0, 2])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_derivative_on_the_breakpoints_follows_autograd(name):
    net = nn.Sequential(nn.Flatten(), ACTIVATIONS[name], nn.Linear(12, 1, bias=False)).eval().double()
    with torch.no_grad():
        net[2].weight.fill_(1.0)
    x = KINKS.view(1, 3, 2, 2)
    assert rel_error(fxrel.Explainer(net, "gradient")(x, 0), autograd_input_gradient(net, x, torch.tensor([0]))) < 1e-14
