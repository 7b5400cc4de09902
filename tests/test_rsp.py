"""RSP and c*RSP (Nam et al. 2021; specs/rsp.md): the invariants of §6 — conservation of S through the shifted
layers (random architectures and four torchvision families), RGAM totals, purging, hostile antisymmetry, weight
independence of the sectional rule, the 1×1 leak, the degenerate official path — bi-polarity and discriminativeness
on a constructed two-object image, and agreement with a literal per-layer implementation of the equations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import fxrel
from fxrel.catalog.method import Method, seed_gradient
from fxrel.catalog.registry import make_method
from fxrel.catalog.rgam import purge, relative_relevance, sections
from fxrel.catalog.sectional import sectional_composite, sectional_rule
from fxrel.graphs import canonicalize, capture, ops
from fxrel.graphs.analysis import cut_nodes, feature_layer
from fxrel.graphs.builder import build_relevance_graph
from fxrel.rules.composite import module
from tests.helpers import object_masses, random_targets, rel_error, two_objects
from tests.strategies import cnn_architectures
from tests.test_models import build
from tests.test_rap import _grad, _sdiv, _z_beta


def small_net(classes: int = 5) -> nn.Sequential:
    """conv 3×3 – ReLU – max-pool – conv 3×3 – ReLU – conv 1×1 – ReLU (= X, module '6') and a VGG-like classifier:
    max-pool – flatten – linear – ReLU – linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 16),
                         nn.ReLU(), nn.Linear(16, classes)).eval().double()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def sweep(model: nn.Module, x: torch.Tensor, targets, methods: dict[str, tuple[str, dict]]):
    """One capture, one relevance graph per method (what ``fxrel.Explainer(...).attribute(x, targets,
    stops=["*"])`` builds); returns the canonical graph and, per label, ``{node: relevance}``."""
    canonical = canonicalize(capture(model, x), (x,))
    with torch.no_grad():
        mask = F.one_hot(torch.as_tensor(targets), model(x).shape[1]).to(x.dtype)
    results = {}
    for label, (name, params) in methods.items():
        method = make_method(name, **params)
        graph = build_relevance_graph(canonical, method.streams(canonical), None, ["*"], method.combine)
        with torch.no_grad():
            out = graph.module(x, mask)
        results[label] = {k.split(":", 1)[1]: v for k, v in out.items() if k.startswith(f"{method.name}:")}
    return canonical, results


def conservation_errors(canonical, results) -> dict[str, float]:
    """Per method: max over the nodes at or below X that all paths pass through of |Σ R − Σ R_X| / |Σ R_X|."""
    layer, _ = feature_layer(canonical)
    order = {n: i for i, n in enumerate(canonical.graph.nodes)}
    errors = {}
    for label, relevance in results.items():
        total = relevance[layer.name].flatten(1).sum(1)
        errors[label] = max(((relevance[n.name].flatten(1).sum(1) - total).abs() / total.abs()).max().item()
                            for n in cut_nodes(canonical) if order[n] <= order[layer])
    return errors


def assert_sections(r_x: torch.Tensor, tolerance: float = 1e-9) -> None:
    """RGAM totals (§6.5): the positive part sums to 2, the negative part to −1 (an empty part to 0)."""
    flat = r_x.flatten(1)
    for pos, neg in zip(flat.clamp(min=0).sum(1), flat.clamp(max=0).sum(1)):
        assert abs(pos - 2) < tolerance or pos == 0
        assert abs(neg + 1) < tolerance or neg == 0


# --- conservation ---------------------------------------------------------------------------------------------------
@given(spec=cnn_architectures(bias=False))
def test_total_at_layer_x_is_kept_down_to_the_input_on_random_architectures(spec):
    """§6.2: the shifted layers keep S = Σ R_X; 1×1 convolutions and the other rules conserve on a bias-free net (no
    live output over a dead input patch), so Σ R = S at every node below X that all paths pass through."""
    model, x = spec.build()
    model, x = model.double(), x.double()
    canonical, results = sweep(model, x, random_targets(model, x),
                               {"rsp": ("rsp", {}), "rsp_all": ("rsp", {"hostile": "all"}), "crsp": ("crsp", {})})
    layer, _ = feature_layer(canonical)
    for label, error in conservation_errors(canonical, results).items():
        assert error < 1e-9, label
        assert_sections(results[label][layer.name])


TORCHVISION = [("vgg16", 64), ("resnet50", 64), ("densenet121", 64), ("inception_v3", 107)]


@pytest.mark.parametrize("name,size", [pytest.param(n, s, marks=[] if n == "vgg16" else [pytest.mark.slow])
                                       for n, s in TORCHVISION], ids=[n for n, _ in TORCHVISION])
def test_conservation_on_torchvision_models(name, size):
    """RAP: Σ R = y_t after every layer; RSP, c*RSP: Σ R = S from X down (random weights, calibrated BatchNorm,
    float64). Measured errors are printed (-s)."""
    model = build("torchvision", name, size).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = [1, 7]
    canonical, results = sweep(model, x, targets, {"rap": ("rap", {}), "rsp": ("rsp", {}), "crsp": ("crsp", {})})
    rap = results.pop("rap")
    with torch.no_grad():
        logits = model(x)[[0, 1], targets]
    logits_node = canonical.graph.find_nodes(op="output")[0].args[0]
    errors = {"rap": max(((rap[n.name].flatten(1).sum(1) - logits).abs() / logits.abs()).max().item()
                         for n in cut_nodes(canonical) if n is not logits_node)}
    errors.update(conservation_errors(canonical, results))
    print(f"\n{name} @ {size} px, relative conservation error: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-9


# --- the relative map at X (§2, §6.5–6.8) ---------------------------------------------------------------------------
def test_rgam_totals_purge_and_official_collapse():
    net, x = small_net(), _x()
    r = {mode: fxrel.Explainer(net, "rsp", rgam_mode=mode, stops=["6"])(x, [1, 3])
         for mode in ("paper", "paper_literal", "official_relative")}
    assert_sections(r["paper"])
    assert_sections(r["official_relative"], 1e-6)  # the official 1e-9 guards in the sums
    for mode in ("paper", "paper_literal"):  # purge (Eq. 2): no unit disagrees with its location's channel sum
        signs = torch.sign(r[mode]), torch.sign(r[mode].sum(1, keepdim=True))
        assert ((signs[0] == signs[1]) | (signs[0] == 0)).all(), mode
    assert torch.equal(torch.sign(r["paper"]), torch.sign(r["paper_literal"]))  # the modes differ in scale only
    assert torch.allclose(r["official_relative"], r["official_relative"][:, :1].expand_as(r["official_relative"]))


@pytest.mark.parametrize("mode", ["paper", "official_relative"])
def test_hostile_antisymmetry(mode):
    """§6.7: with one hostile class, F(t; h) = −F(h; t): the positive locations of one map are the negative ones of
    the other."""
    net, x = small_net(classes=2), _x()
    one, other = (fxrel.Explainer(net, "rsp", rgam_mode=mode, hostile="all", stops=["6"])(x, t) for t in (0, 1))
    assert torch.equal(torch.sign(one), -torch.sign(other))


def test_official_single_is_the_max_normalised_gradient_map_propagated():
    """§6.8: rgam_mode='official_single' is the official main.py: A ⊙ GAP(∂y_t/∂A), divided by its max + 1e-9, then
    the sectional propagation — here built from the gradient explainer (as Grad-CAM is) and the sectional rules
    started at X."""
    net, x = small_net(), _x()
    grad = fxrel.Explainer(net, "gradient", stops=["6"]).attribute(x, [1, 3])
    cam = grad.values["6"] * grad.relevance["6"].mean((2, 3), keepdim=True)
    r_x = cam / (cam.flatten(1).amax(1)[:, None, None, None] + 1e-9)
    sectional = fxrel.Explainer(net, Method("sectional", sectional_composite(), seed_gradient), start="6")
    expected = sectional(x, seed=r_x)
    assert rel_error(fxrel.Explainer(net, "rsp", rgam_mode="official_single")(x, [1, 3]), expected) < 1e-12


def test_crsp_starts_from_contrastive_excitation_backprop_at_x():
    """c*RSP's F is the contrastive EB signal at X (target − dual with the classifier negated), then steps 3–4."""
    net, x = small_net(), _x()
    f = fxrel.Explainer(net, "contrastive_excitation_backprop", stops=["6"])(x, [1, 3])
    for mode in ("paper", "official_relative"):
        r_x = fxrel.Explainer(net, "crsp", rgam_mode=mode, stops=["6"])(x, [1, 3])
        assert rel_error(r_x, relative_relevance(f, mode)) < 1e-12
    assert rel_error(relative_relevance(f, "paper"), sections(purge(f))) == 0


# --- the sectional rule (§3.1, §6.1–6.4) ----------------------------------------------------------------------------
def _sectional_step(net: nn.Module, start: str, stop: str, upper: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    method = Method("sectional", sectional_composite(), seed_gradient)
    return fxrel.Explainer(net, method, start=start, stops=[stop])(x, seed=upper)


def test_sectional_rule_ignores_the_layer_weights_and_keeps_the_total():
    """§6.1: ν depends on x, R and the conv's geometry only; §6.2: at a 3×3 conv Σ R̈ = Σ R; Eq. 5: R̈ − 2R̂ is
    constant on the support of R̂."""
    net, x = small_net(), _x()
    upper = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shifted = _sectional_step(net, "3", "2", upper, x)
    other = small_net()
    with torch.no_grad():
        other[3].weight.normal_()
    assert torch.equal(_sectional_step(other, "3", "2", upper, x), shifted)
    assert torch.allclose(shifted.flatten(1).sum(1), upper.flatten(1).sum(1), rtol=1e-12)
    unshifted = Method("hat", sectional_composite().with_rules([(module("3"), sectional_rule())]), seed_gradient)
    hat = fxrel.Explainer(net, unshifted, start="3", stops=["2"])(x, seed=upper).flatten(1)
    for i in range(2):
        on = hat[i] != 0
        step = (shifted.flatten(1)[i] - 2 * hat[i])[on]
        assert torch.allclose(step, step[0].expand_as(step)) and (shifted.flatten(1)[i][~on] == 0).all()
        assert shifted[i].min() < 0 < shifted[i].max()  # §6.9 bipolarity


def test_pointwise_convolution_leaks_exactly_the_relevance_over_dead_inputs():
    """§6.3: a 1×1 conv has no shift; R at output positions whose input vector is all zero is lost, and with R on
    live positions only the rule conserves."""
    net, x = small_net(), _x()
    x[..., :8] = 0                     # a blank left part: the first conv's output (no bias) and pooling are 0 there
    with torch.no_grad():
        net[0].bias.zero_()
        net[3].bias.fill_(-1.0)          # and the second conv gives −1 there: its ReLU, the 1×1 conv's input, is 0
    dead = (fxrel.Explainer(net, "gradient", stops=["4"]).attribute(x, 0).values["4"] == 0).all(1, keepdim=True)
    assert dead.any()
    upper = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaked = _sectional_step(net, "5", "4", upper, x).flatten(1).sum(1)
    assert torch.allclose(leaked, (upper * ~dead).flatten(1).sum(1), rtol=1e-12)
    assert not torch.allclose(leaked, upper.flatten(1).sum(1))
    live = upper * ~dead
    assert torch.allclose(_sectional_step(net, "5", "4", live, x).flatten(1).sum(1), live.flatten(1).sum(1))


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [(3, 2, 1, 1, 2), (1, 1, 0, 1, 1), (3, 1, 2, 2, 4)])
def test_per_sample_convolution_ops_match_autograd(kernel, stride, padding, dilation, groups):
    """The engine's per-sample convolution: the weight VJP (Eq. 3's ν, ≥ 0 for x, grad ≥ 0), the forward pass and
    the input VJP with one weight tensor per image equal autograd's, image by image."""
    conv = nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups).double().eval()
    x = torch.rand(3, 4, 11, 9, dtype=torch.float64)
    node = next(n for n in canonicalize(capture(nn.Sequential(conv).eval(), x), (x,)).graph.nodes
                if n.meta.get("fxrel_kind") == "conv")
    per_sample = ops.spec_of(node).per_sample
    grad = torch.rand_like(conv(x))
    nu = per_sample.weight_vjp(node, grad, [x])
    weights = torch.randn(3, *conv.weight.shape, dtype=torch.float64)
    out, (back,) = per_sample.forward(node, [x], weights), per_sample.vjp(node, grad, [x], weights)
    assert nu.min() >= 0
    for n in range(3):
        w, xn = conv.weight.detach().clone().requires_grad_(), x[n:n + 1].clone().requires_grad_()
        assert torch.allclose(_grad(conv._conv_forward(x[n:n + 1], w, None), w, grad[n:n + 1]), nu[n])
        yn = conv._conv_forward(xn, weights[n], None)
        assert torch.allclose(yn, out[n:n + 1]) and torch.allclose(_grad(yn, xn, grad[n:n + 1]), back[n:n + 1])


# --- bi-polarity and discriminativeness -----------------------------------------------------------------------------
def test_rsp_is_positive_on_the_target_object_and_negative_on_the_hostile_one():
    model, x = two_objects()
    with torch.no_grad():
        assert (model(x) > 0).all()  # both classes predicted: each is the other's hostile class
    figures = {}
    for method in ("rsp", "crsp", "rap"):
        for target, name in ((0, "A"), (1, "B")):
            figures[f"{method}({name})"] = object_masses(fxrel.Explainer(model, method)(x, target))
    print("\nrelevance on object A, on object B, positive share on A's half: "
          + "; ".join(f"{k}: {a:+.3f}, {b:+.3f}, {s:.3f}" for k, (a, b, s) in figures.items()))
    for method in ("rsp", "crsp"):
        a_on_a, a_on_b, a_share = figures[f"{method}(A)"]
        b_on_a, b_on_b, b_share = figures[f"{method}(B)"]
        assert a_on_a > 0 > a_on_b and b_on_b > 0 > b_on_a, method
        assert a_share > 0.99 and b_share < 0.01, method
    # the official RAP's absolute influence makes the hostile object relevant too (rap.md §6.6); the default's signed
    # classifier does not
    official = object_masses(fxrel.Explainer(model, "rap", first_prop="official", dense="rap")(x, 0))
    assert official[1] > 0 >= figures["rap(A)"][1]


# --- the literal per-layer implementation ---------------------------------------------------------------------------
def _purge_and_sections(f: torch.Tensor) -> torch.Tensor:
    f = f * (torch.sign(f) == torch.sign(f.sum(1, keepdim=True)))
    pos, neg = f.clamp(min=0), f.clamp(max=0)
    return 2 * _sdiv(pos, pos.sum()) + _sdiv(neg, -neg.sum())


def _rgam_paper(head: nn.Module, a: torch.Tensor, target: int) -> torch.Tensor:
    """Eq. 1–2 and steps 3–4 (paper mode, hostile = the other classes with a positive score), class by class."""
    a = a.clone().requires_grad_()
    y = head(a)
    maps = []
    for c in range(y.shape[1]):
        g = torch.autograd.grad(y[0, c], a, retain_graph=True)[0]
        cam = torch.relu(a * g.mean((2, 3), keepdim=True)).detach()
        maps.append(_sdiv(cam, cam.max()))
    hostile = [c for c in range(y.shape[1]) if c != target and y[0, c] > 0]
    f = len(hostile) * maps[target] - sum(maps[h] for h in hostile) if hostile else maps[target]
    return _purge_and_sections(f)


def _sectional_reference(conv: nn.Conv2d, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The official RSP_relprop of a conv (rsp.md §3.1), with autograd for ν and the VJPs."""
    x = a.clamp(min=0).requires_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    p, n = r.clamp(min=0), -r.clamp(max=0)
    b_pos, b_neg = (p != 0).to(r.dtype), (n != 0).to(r.dtype)

    def f(v, weight):
        return F.conv2d(v, weight, None, conv.stride, conv.padding)

    nu_pos = _grad(f(x, w) * b_pos, w, p)
    nu_neg = _grad(f(x, w) * b_neg, w, n)
    ga, gb = f(x, nu_pos) * b_pos, f(x, nu_neg) * b_neg
    hat = (x * _grad(ga, x, _sdiv(p, ga)) - x * _grad(gb, x, _sdiv(n, gb))).detach()
    if conv.kernel_size == (1, 1):
        return hat
    doubled = 2 * hat
    nonzero = (doubled != 0).to(r.dtype)
    return doubled - _sdiv(r.sum(), nonzero.sum()) * nonzero


def rsp_reference(net: nn.Sequential, x: torch.Tensor, target: int, split: int) -> torch.Tensor:
    """RSP of one image, layer by layer (X = the output of ``net[:split]``)."""
    acts = [x]
    with torch.no_grad():
        for m in net[:split]:
            acts.append(m(acts[-1]))
    r = _rgam_paper(net[split:], acts[-1], target)
    for i in reversed(range(split)):
        m, a = net[i], acts[i]
        if isinstance(m, nn.Conv2d):
            r = _z_beta(m, a, r).detach() if i == 0 else _sectional_reference(m, a, r)
        elif isinstance(m, nn.MaxPool2d):  # the z-rule on x + 1e-9, positive and negative parts separately
            v = (a + 1e-9).requires_grad_()
            z = m(v)
            r = (v * (_grad(z, v, _sdiv(r.clamp(min=0), z)) + _grad(z, v, _sdiv(r.clamp(max=0), z)))).detach()
    return r


def test_explicit_graph_equals_the_literal_per_layer_equations():
    net, x = small_net(), _x(3)
    targets = [1, 3, 0]
    with torch.no_grad():
        assert ((net(x) > 0).sum(1) > 1).all()  # every image has hostile classes
    graph = fxrel.Explainer(net, "rsp")(x, targets)
    reference = torch.cat([rsp_reference(net, x[i:i + 1], t, split=7) for i, t in enumerate(targets)])
    assert rel_error(graph, reference) < 1e-6
    print(f"\nRSP explicit graph vs literal equations: relative error {rel_error(graph, reference):.2g}")


# --- layer choice, batching, compiling, registry --------------------------------------------------------------------
def test_layer_x_found_automatically_or_by_name_with_clear_errors():
    net, x = small_net(), _x()
    explainer = fxrel.Explainer(net, "rsp")
    assert feature_layer(explainer.canonical_graph(x))[0].meta["fxrel_module"] == "6"
    assert torch.equal(fxrel.Explainer(net, "rsp", layer="6")(x, [1, 3]), explainer(x, [1, 3]))
    earlier = fxrel.Explainer(net, "rsp", layer="4", stops=["4"]).attribute(x, [1, 3]).relevance["4"]
    assert_sections(earlier)
    with pytest.raises(fxrel.RuleError, match="feature maps: 0, 1, 2, 3, 4, 5, 6, 7"):
        fxrel.Explainer(net, "rsp", layer="features")(x, 0)
    with pytest.raises(fxrel.RuleError, match="spatial feature map"):
        fxrel.Explainer(net, "rsp", layer="9")(x, 0)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(432, 3)).eval().double()
    with pytest.raises(fxrel.RuleError, match="has none"):
        fxrel.Explainer(flat, "rsp")(x, 0)
    with pytest.raises(fxrel.RuleError, match="does not separate"):
        fxrel.Explainer(Skip().eval(), "rsp", layer="branch")(torch.randn(1, 3, 8, 8), 0)


class Skip(nn.Module):
    """stem – ReLU – (+ branch conv) – ReLU – mean – linear: the branch conv lies inside the residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(h + self.branch(h)).mean((2, 3)))


@pytest.mark.parametrize("method", ["rsp", "crsp"])
def test_batched_equals_per_image(method):
    net, x = small_net(), _x(3)
    targets = [4, 0, 2]
    batched = fxrel.Explainer(net, method)(x, targets)
    single = torch.cat([fxrel.explain(net, x[i:i + 1], t, method=method) for i, t in enumerate(targets)])
    assert rel_error(batched, single) < 1e-12


@pytest.mark.parametrize("method", ["rsp", pytest.param("crsp", marks=pytest.mark.slow)])
def test_compiled_equals_eager(method):
    """torch.compile(fullgraph=True) of the whole graph: helper streams, entry seed, per-sample convolutions."""
    net, x = small_net(), _x(2)
    eager = fxrel.Explainer(net, method)(x, [1, 3])
    assert rel_error(fxrel.Explainer(net, method, compile=True)(x, [1, 3]), eager) < 1e-10


def test_registered_with_their_output_conventions():
    catalogue = fxrel.methods(detail=True)
    assert catalogue["rsp"]["defaults"] == {"rgam_mode": "paper", "hostile": "predicted", "layer": None}
    assert catalogue["crsp"]["defaults"] == {"rgam_mode": "paper", "layer": None}
    for name in ("rsp", "crsp"):
        assert "Nam" in catalogue[name]["reference"] and "Σ R = 1" in catalogue[name]["output"]
    with pytest.raises(fxrel.RuleError, match="rgam_mode"):
        fxrel.Explainer(small_net(), "crsp", rgam_mode="official_single")
    with pytest.raises(fxrel.RuleError, match="hostile"):
        fxrel.Explainer(small_net(), "rsp", hostile="others")


def test_repeated_rules_see_a_consistent_context_even_with_per_sample_weights():
    """``Repeated(rule, K)`` hands the rule a replaced context (inputs and output repeated), so per-sample weight
    VJPs work (RSP's sectional rule): copy k of a stream seeded with ``c_k · e_t`` equals ``c_k`` times the plain
    sweep (the rules are homogeneous of degree 1 in the relevance)."""
    from fxrel.rules import Gradient, kind
    from fxrel.rules.batched import Repeated
    from fxrel.rules.composite import Composite

    net, x = small_net().double(), _x().double()
    canonical = canonicalize(capture(net, x), (x,))

    def run(copies: int, seed) -> torch.Tensor:
        composite = Composite([(kind(ops.CONV), Repeated(sectional_rule(), copies)),
                               (lambda node, info: True, Repeated(Gradient(), copies))])
        streams = Method("repeated", composite, seed).streams(canonical)
        graph = build_relevance_graph(canonical, streams)
        mask = torch.zeros(len(x), 5, dtype=x.dtype)
        mask[:, 2] = 1
        return next(v for k, v in graph.module(x, mask).items() if k.startswith("repeated:"))

    plain = run(1, seed_gradient)
    both = run(2, lambda output, mask: torch.cat([mask, 3 * mask]))
    assert both.shape == (2 * len(x), *x.shape[1:])
    assert rel_error(both[:len(x)], plain) < 1e-12 and rel_error(both[len(x):], 3 * plain) < 1e-12
