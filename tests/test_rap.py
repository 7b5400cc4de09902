"""RAP (Nam et al. 2020; specs/rap.md): the invariants of §6 — conservation after every layer on random architectures
(residual sums, forks and concatenations included), the sign and proportionality of the first step, the shift
identity and the bipolarity it creates, the support of the relevance, the documented seed modes — and agreement
with a literal per-layer implementation of the official code's equations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import fxrel
from fxrel.catalog.method import Method, seed_gradient
from fxrel.catalog.rap import RAPLayer, rap_composite
from fxrel.graphs.analysis import cut_nodes
from fxrel.rules.composite import module
from tests.helpers import random_targets, rel_error
from tests.strategies import cnn_architectures


def small_net(classes: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(72, 16), nn.ReLU(),
                         nn.Linear(16, classes)).eval().double()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _logits(explanation: fxrel.Explanation) -> torch.Tensor:
    return explanation.output[torch.arange(len(explanation.targets)), explanation.targets]


# --- §6.1 conservation ---------------------------------------------------------------------------------------------
def conservation_error(explainer: fxrel.Explainer, x: torch.Tensor, targets: torch.Tensor) -> float:
    """max over the cut nodes below the logits of |Σ R − y_t| / max(|y_t|, 1e-3)."""
    explanation = explainer.attribute(x, targets, stops=["*"])
    canonical = explainer.canonical_graph(x)
    logits = _logits(explanation)
    output = canonical.graph.find_nodes(op="output")[0].args[0]
    worst = 0.0
    for node in cut_nodes(canonical):
        if node is not output:
            sums = explanation.relevance[node.name].flatten(1).sum(1)
            worst = max(worst, ((sums - logits).abs() / logits.abs().clamp(min=1e-3)).max().item())
    return worst


@given(spec=cnn_architectures(bias=False))
def test_relevance_sum_is_the_logit_after_every_layer(spec):
    """§6.1 on sequential, residual, dense and inception nets: every conv/linear step ends with the shift, the other
    rules conserve, forks sum — so Σ R = y_t at every node all paths pass through, down to the input."""
    model, x = spec.build()
    model, x = model.double(), x.double()
    assert conservation_error(fxrel.Explainer(model, "rap"), x, random_targets(model, x)) < 1e-8


# --- §6.2 sign after the first step --------------------------------------------------------------------------------
OFFICIAL = dict(first_prop="official", dense="rap")   # the official code's settings


def test_first_step_gives_every_unit_the_logits_sign_in_proportion_to_its_contribution():
    net, x = small_net(), _x()
    explanation = fxrel.Explainer(net, "rap", stops=["8"], **OFFICIAL).attribute(x, [1, 3])
    r, a = explanation.relevance["8"], explanation.values["8"]     # the input of the last linear layer (≥ 0)
    y = _logits(explanation)
    contribution = (a * net[9].weight[[1, 3]]).abs()
    assert (r * y[:, None] >= 0).all()
    ratio = r / contribution
    live = contribution > 0
    for i in range(2):
        assert torch.allclose(ratio[i][live[i]], y[i] / contribution[i].sum(), rtol=1e-10)


def test_signed_first_step_returns_each_units_contribution_with_the_bias_shares():
    """first_prop='signed' (default): R_i = x_i w_ti + the bias shares of §2 — both signs, Σ = y_t; without a bias
    exactly x_i w_ti."""
    net, x = small_net(), _x()
    explanation = fxrel.Explainer(net, "rap", stops=["8"]).attribute(x, [1, 3])
    r, a = explanation.relevance["8"], explanation.values["8"]
    assert torch.allclose(r.sum(1), _logits(explanation), rtol=1e-10)
    assert (r < 0).any() and (r > 0).any()
    with torch.no_grad():
        net[9].bias.zero_()
    explanation = fxrel.Explainer(net, "rap", stops=["8"]).attribute(x, [1, 3])
    assert rel_error(explanation.relevance["8"], a * net[9].weight[[1, 3]]) < 1e-12


# --- §6.4 shift identity, §6.3 bipolarity, §6.5 support -----------------------------------------------------------
def test_shift_is_uniform_on_the_support_and_makes_the_relevance_bipolar():
    net, x = small_net(), _x()
    upper = torch.rand(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = {}
    shifted = RAPLayer(linear=False)
    for name, rule in (("before", shifted.positive.rule), ("after", shifted)):
        method = Method(name, rap_composite().with_rules([(module("3"), rule)]), seed_gradient)
        results[name] = fxrel.Explainer(net, method, start="3", stops=["2"])(x, seed=upper)
    before, after = results["before"].flatten(1), results["after"].flatten(1)
    for i in range(2):
        on = before[i] != 0
        step = (after[i] - before[i])[on]
        assert torch.allclose(step, step[0].expand_as(step), atol=1e-12)
        assert (after[i][~on] == 0).all()
        assert abs(after[i].sum() - upper[i].sum()) < 1e-10 < (before[i].sum() - upper[i].sum()).abs()
        assert before[i].min() >= 0 and after[i].min() < 0 < after[i].max()  # positive R in, both signs out


def test_relevance_stays_on_active_units():
    """§6.5: below the first layer, relevance sits only where the layer input is non-zero."""
    net, x = small_net(), _x()
    explanation = fxrel.Explainer(net, "rap", stops=["1", "2", "5", "8"]).attribute(x, [1, 3])
    for stop in ("1", "2", "5", "8"):
        assert (explanation.relevance[stop][explanation.values[stop] == 0] == 0).all(), stop


# --- §6.7 seed modes, negative inputs -------------------------------------------------------------------------------
def test_a_seed_whose_maximum_is_not_one_takes_the_general_rule_at_the_classifier():
    """The official code tests R.max() == 1: a scaled one-hot seed (AGF/UCAG's y_t e_t) skips the first step. So the
    official mode with seed s·e_t equals first_prop='generic' (which seeds y_t·mask) with mask s/y_t·e_t, and is
    not s times the official result."""
    net, x = small_net(), _x()
    y = net(x).detach()
    seed = torch.zeros_like(y)
    seed[0, 1], seed[1, 3] = 2.5, 2.5
    official = fxrel.Explainer(net, "rap", **OFFICIAL)
    scaled = official(x, seed=seed)
    generic = fxrel.Explainer(net, "rap", first_prop="generic", dense="rap")(x, seed=seed / y)
    assert rel_error(scaled, generic) < 1e-10
    assert rel_error(scaled, 2.5 * official(x, [1, 3])) > 0.1


def test_negative_inputs_flag_adds_the_x_minus_half_with_its_own_shift():
    """§3.1: with negative_inputs=True a layer whose input has negative entries gets a second, separately shifted
    part, so Σ R is counted twice there (the official behaviour); the default uses x⁺ only and conserves."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 144, 3)).eval().double()
    x = _x()
    for flag, factor in ((False, 1.0), (True, 2.0)):
        explanation = fxrel.Explainer(net, "rap", negative_inputs=flag, stops=["0"]).attribute(x, [0, 2])
        assert torch.allclose(explanation.relevance["0"].flatten(1).sum(1), factor * _logits(explanation),
                              rtol=1e-9), flag


# --- the literal per-layer implementation ---------------------------------------------------------------------------
def _sdiv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _grad(z: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The official code's gradprop: (∂z/∂x)ᵀ s by autograd."""
    return torch.autograd.grad(z, x, s, retain_graph=True)[0]


def _shift(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    nonzero = (c != 0).to(c.dtype)
    return c - _sdiv(c.sum() - r.sum(), nonzero.sum()) * nonzero


def _rap_layer(f, weight, a, r, linear):
    """§3.1, the spec's four terms with the masks M = 1[R ≠ 0], then the shift."""
    x = a.clamp(min=0).detach().requires_grad_()
    m = (r != 0).to(r.dtype)
    za1, za2 = f(x, weight.clamp(min=0)) * m, f(x, -weight.clamp(max=0)) * m
    d = za1 + za2
    rp, rn = r.clamp(min=0), r.clamp(max=0)
    third = x * _grad(za1, x, _sdiv(rn, za1)) if linear else x * _grad(za2, x, _sdiv(rn, za2))
    c = x * _grad(za1, x, _sdiv(rp, za1)) + x * _grad(za2, x, _sdiv(rp, d)) + third + x * _grad(za2, x, _sdiv(rn, d))
    return _shift(c.detach(), r)


def _first_prop(layer, a, r, absolute=True):
    """§2: the contributions and (``absolute``, the official first_prop) their influence redistribution."""
    px, nx = a.clamp(min=0).requires_grad_(), a.clamp(max=0).requires_grad_()
    pw, nw = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    z1, z2, z3, z4 = F.linear(px, pw), F.linear(px, nw), F.linear(nx, pw), F.linear(nx, nw)
    pos, neg = ((z1 + z4) * r).sum(), ((z2 + z3) * r).sum()
    c = (px * _grad(z1, px, _sdiv(z1 * r, z1)) + px * _grad(z2, px, _sdiv(z2 * r, z2))
         + nx * _grad(z3, nx, _sdiv(z3 * r, z3)) + nx * _grad(z4, nx, _sdiv(z4 * r, z4))
         + px * _grad(z1, px, _sdiv(layer.bias * r * _sdiv(pos, pos + neg), z1))
         + px * _grad(z2, px, _sdiv(layer.bias * r * _sdiv(neg, pos + neg), z2))).detach()
    return c.abs() * c.sum() / c.abs().sum() if absolute else c


def _pooled_z_rule(pool, a, r):
    """The official pooling rule: ``a ⊙ ∇pool(a)ᵀ sdiv(r, pool(a))`` by autograd."""
    v = a.clone().requires_grad_()
    z = pool(v)
    return (a * _grad(z, v, _sdiv(r, z))).detach()


def _z_beta(conv, a, r):
    """§3.2 with the image's own min and max."""
    t = torch.zeros_like(a, requires_grad=True)
    low, high = torch.full_like(a, a.min()), torch.full_like(a, a.max())
    wp, wn = conv.weight.clamp(min=0), conv.weight.clamp(max=0)

    def f(x, w):
        return F.conv2d(x, w, None, conv.stride, conv.padding)

    s = _sdiv(r, f(a, conv.weight) - f(low, wp) - f(high, wn))
    return a * _grad(f(t, conv.weight), t, s) - low * _grad(f(t, wp), t, s) - high * _grad(f(t, wn), t, s)


def _signed_dense(layer, a, r):
    """dense='signed': the bias-free z-rule ``a ⊙ Wᵀ sdiv(r, W a)``."""
    return a * (_sdiv(r, F.linear(a, layer.weight)) @ layer.weight)


def rap_reference(net: nn.Sequential, x: torch.Tensor, target: int, official: bool = True) -> torch.Tensor:
    """RAP of one image, layer by layer as in the official code (rap.md §2–3); ``official=False``: the defaults
    (signed first step, signed dense layers)."""
    acts = [x]
    with torch.no_grad():
        for m in net:
            acts.append(m(acts[-1]))
    r = F.one_hot(torch.tensor([target]), acts[-1].shape[1]).to(x.dtype)
    for i in reversed(range(len(net))):
        m, a = net[i], acts[i]
        if i == len(net) - 1:
            r = _first_prop(m, a, r, absolute=official)
        elif isinstance(m, nn.Linear) and not official:
            r = _signed_dense(m, a, r)
        elif isinstance(m, nn.Linear):
            r = _rap_layer(lambda v, w: F.linear(v, w), m.weight, a, r, linear=True)
        elif isinstance(m, nn.Conv2d) and i == 0:
            r = _z_beta(m, a, r)
        elif isinstance(m, nn.Conv2d):
            r = _rap_layer(lambda v, w, m=m: F.conv2d(v, w, None, m.stride, m.padding), m.weight, a, r, linear=False)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            r = _pooled_z_rule(m, a, r)
        elif isinstance(m, nn.Flatten):
            r = r.reshape(a.shape)
    return r


@pytest.mark.parametrize("official", [True, False])
def test_explicit_graph_equals_the_literal_per_layer_equations(official):
    net, x = small_net(), _x(3)
    targets = [1, 3, 0]
    graph = fxrel.Explainer(net, "rap", **(OFFICIAL if official else {}))(x, targets)
    reference = torch.cat([rap_reference(net, x[i:i + 1], t, official) for i, t in enumerate(targets)])
    assert rel_error(graph, reference) < 1e-10  # to float64 rounding


# --- batching, compiling, registry ----------------------------------------------------------------------------------
def test_batched_equals_per_image():
    net, x = small_net(), _x(3)
    targets = [4, 0, 2]
    batched = fxrel.Explainer(net, "rap")(x, targets)
    single = torch.cat([fxrel.explain(net, x[i:i + 1], t, method="rap") for i, t in enumerate(targets)])
    assert rel_error(batched, single) < 1e-12


@pytest.mark.slow
def test_compiled_equals_eager():
    net, x = small_net(), _x(2)
    eager = fxrel.Explainer(net, "rap")(x, [1, 3])
    assert rel_error(fxrel.Explainer(net, "rap", compile=True)(x, [1, 3]), eager) < 1e-10


def test_registered_with_its_output_convention():
    entry = fxrel.methods(detail=True)["rap"]
    assert entry["defaults"] == {"first_prop": "signed", "dense": "signed", "negative_inputs": False,
                                 "residual": "absolute"}
    assert "y_t" in entry["output"] and "Nam" in entry["reference"]
    with pytest.raises(fxrel.RuleError, match="first_prop"):
        fxrel.Explainer(small_net(), "rap", first_prop="agf")
    with pytest.raises(fxrel.RuleError, match="dense"):
        fxrel.Explainer(small_net(), "rap", dense="epsilon")
    with pytest.raises(fxrel.RuleError, match="residual"):
        fxrel.Explainer(small_net(), "rap", residual="signed")


class _NearlyCancellingSum(torch.nn.Module):
    """y = w · relu(x) + (−0.9 · w) · relu(x): the two operands of the sum nearly cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = torch.nn.Conv2d(2, 2, 1, bias=False)
        self.skip = torch.nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(torch.tensor([[1.0, 0.5], [0.2, 1.0]]).view(2, 2, 1, 1))
            self.skip.weight.copy_(-0.9 * self.branch.weight)
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(2, 3, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x)
        return self.head(self.branch(h) + self.skip(h))


@pytest.mark.parametrize("residual, bounded", [("absolute", True), ("official", False)])
def test_residual_sum_rule_conserves_and_only_the_absolute_split_stays_bounded(residual, bounded):
    """Both residual rules keep Σ R; where the operands nearly cancel the official signed z-rule sends
    ±(1/0.1) · R into the two branches, the absolute split at most |R|."""
    net = _NearlyCancellingSum().double().eval()
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    explanation = fxrel.Explainer(net, "rap", residual=residual).attribute(x, 0, stops=["*"])
    add = next(n for n in explanation.relevance if n.startswith("add"))
    branch = next(n for n in explanation.relevance if n.startswith("convolution") and n.endswith("default"))
    r_add, r_branch = explanation.relevance[add], explanation.relevance[branch]
    with torch.no_grad():
        assert abs(float(r_add.sum()) - float(net(x)[0, 0])) < 1e-10
    amplification = float(r_branch.abs().sum() / r_add.abs().sum())
    assert (amplification <= 1 + 1e-9) == bounded, amplification
