"""Opt-in heavy checks (``python3 -m pytest -m slow``): full-size inputs and compiling a full ResNet-50."""
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
    model = build(source, name, size)
    x = torch.randn(2, 3, size, size)
    targets = torch.tensor([0, 9])
    reference = autograd_input_gradient(model, x, targets)
    assert rel_error(fxrel.Explainer(model, "gradient")(x, targets), reference) < 1e-4
    assert rel_error(fxrel.Explainer(model, "lrp_0")(x, targets), reference * x) < 1e-3


def test_timm_resnet50_compiles_without_graph_breaks():
    model = build("timm", "resnet50", 224)
    x = torch.randn(2, 3, 224, 224)
    eager = fxrel.Explainer(model, "epsilon_plus_flat")
    graph = eager.relevance_graph(x)
    mask = torch.zeros(2, 10)
    mask[:, 3] = 1
    explanation = torch._dynamo.explain(graph.module)(x, mask)
    assert explanation.graph_break_count == 0
    compiled = fxrel.Explainer(model, "epsilon_plus_flat", compile=True)
    assert rel_error(compiled(x, 3), eager(x, 3)) < 1e-4
