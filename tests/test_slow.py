"""Opt-in heavy checks (``python3 -m pytest -m slow``): full-size inputs and compiling a full ResNet-50.

Exactness is checked in float64: in float32 the rounding of folded BatchNorms flips a few ReLUs whose input is
within ~1e-7 of zero, which changes a 224² gradient by 1e-2 of its maximum (measured: 2–6 % on the calibrated
random models here, 3e-15 in float64).
"""
from __future__ import annotations

import pytest
import torch

import fxrel
from tests.helpers import autograd_input_gradient, rel_error
from tests.test_models import MODELS, build

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("source,name", [(s, n) for s, n, _ in MODELS], ids=[f"{s}-{n}" for s, n, _ in MODELS])
def test_full_size_gradient_and_lrp0(source, name):
    size = 299 if "inception" in name else 224
    model = build(source, name, size).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    targets = torch.tensor([0, 9])
    reference = autograd_input_gradient(model, x, targets)
    assert rel_error(fxrel.Explainer(model, "gradient")(x, targets), reference) < 1e-10
    assert rel_error(fxrel.Explainer(model, "lrp_0")(x, targets), reference * x) < 1e-8


def test_timm_resnet50_compiles_without_graph_breaks():
    model = build("timm", "resnet50", 224).double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    eager = fxrel.Explainer(model, "epsilon_plus_flat")
    graph = eager.relevance_graph(x)
    mask = torch.zeros(2, 10, dtype=torch.float64)
    mask[:, 3] = 1
    explanation = torch._dynamo.explain(graph.module)(x, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = fxrel.Explainer(model, "epsilon_plus_flat", compile=True)
    assert rel_error(compiled(x, 3), eager(x, 3)) < 1e-10
