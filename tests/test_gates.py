"""Squeeze-excitation gates (``value ⊙ gate`` with the gate broadcast over space) as the canonical GATE kind: exact
gradient to both operands, every rule set treats the gate as a weight (the relevance goes to the value), LRP-0, RAP,
AGF and SRD keep their sums, and the CAM/RSP layer search skips the gate's pooling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrel
from tests.helpers import autograd_input_gradient, rel_error


class _SE(nn.Module):
    def __init__(self, channels: int, bias: bool) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, 2, 1, bias=bias), nn.Conv2d(2, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class _ECA(nn.Module):
    """timm's efficient channel attention: a 1-D conv across channels, the gate expanded to the map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1, 1, 1)
        return x * torch.sigmoid(y).expand_as(x)


def test_an_expanded_gate_from_a_1d_conv_is_a_gate_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), _ECA(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 4)).eval().double()
    x, targets = _x(), torch.tensor([1, 3])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12
    kinds = [n.meta.get("fxrel_kind") for n in fxrel.Explainer(net, "lrp_0").canonical_graph(x).graph.nodes]
    assert "gate" in kinds and torch.isfinite(fxrel.explain(net, x, targets, method="lrp_epsilon")).all()


def se_net(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), _SE(6, bias),
                         nn.Conv2d(6, 6, 3, padding=1, bias=bias), nn.ReLU(), _SE(6, bias),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4, bias=bias)).eval().double()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_gradient_through_the_gate_and_its_branch_equals_autograd():
    net, x, targets = se_net(), _x(), torch.tensor([1, 3])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12


def test_a_gate_on_a_one_by_one_map_is_recognised_by_its_sigmoid():
    """At the smallest inputs the last stage's maps are 1×1, shaped like the gate: the squashed operand is the gate."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=8), nn.ReLU(), _SE(6, True), nn.Flatten(), nn.Linear(6, 4))
    net = net.eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert rel_error(fxrel.Explainer(net, "gradient")(x, [0, 1]), autograd_input_gradient(net, x, torch.tensor([0, 1]))
                     ) < 1e-12
    graph = fxrel.Explainer(net, "gradient").canonical_graph(x)
    gate = next(n for n in graph.graph.nodes if n.meta.get("fxrel_kind") == "gate")
    assert gate.args[1].meta["fxrel_kind"] == "activation"


def test_the_canonical_graph_has_gate_nodes():
    explainer = fxrel.Explainer(se_net(), "lrp_0")
    kinds = [n.meta.get("fxrel_kind") for n in explainer.canonical_graph(_x()).graph.nodes]
    assert kinds.count("gate") == 2
    assert "GateAsWeight" in str(explainer.rule_plan(_x()))


@pytest.mark.parametrize("method", ["lrp_0", "rap", "agf", "srd"])
def test_conserving_methods_keep_the_sum_with_the_gate_as_a_weight(method):
    """Bias-free: LRP-0 and RAP end with Σ R = y_t; AGF and SRD keep their own totals from the start layer down."""
    net, x = se_net(bias=False), _x()
    explainer = fxrel.Explainer(net, method)
    r = explainer(x, [0, 2]).flatten(1).sum(1)
    assert torch.isfinite(r).all()
    if method in ("lrp_0", "rap"):
        with torch.no_grad():
            assert torch.allclose(r, net(x)[[0, 1], [0, 2]], rtol=1e-9)
    else:  # AGF: Σ X⊙∂ŷ/∂X at the classifier's input; SRD: Σ of the initial ratio at X (the last gate)
        top = explainer.attribute(x, [0, 2], stops=["7" if method == "agf" else "5"]).relevance
        total = next(iter(top.values())).flatten(1).sum(1)
        assert torch.allclose(r, total, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["gradient_x_input", "epsilon_plus_flat", "clrp", "sglrp",
                                    "contrastive_excitation_backprop", "rsp", "crsp", "grad_cam"])
def test_every_method_runs_on_a_gated_net(method):
    r = fxrel.explain(se_net(), _x(), [0, 2], method=method)
    assert torch.isfinite(r).all()


def test_the_cam_layer_is_the_last_feature_map_not_the_gate_pooling():
    from fxrel.cam import default_cam_layer

    net = se_net()
    layer = default_cam_layer(net, _x())
    graph = fxrel.Explainer(net, "gradient").canonical_graph(_x())
    node = next(n for n in graph.graph.nodes if n.name == layer)
    assert node.meta["fxrel_kind"] == "gate" and node.meta["fxrel_module"] == "5"
