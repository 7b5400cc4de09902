"""AGF (Gur, Ali, Wolf 2021; specs/agf.md): the invariants of §10 — conservation after every layer on random
architectures (Δ-shift), the shift identity, the initial attribution against autograd, the factorization operator on
constructed maps, class specificity on a two-object image — and agreement with a literal per-layer implementation of
the official code's equations (autograd for the gradient stream, ``torch.linalg.solve`` for the factorization)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxrel
from fxrel.catalog.agf import delta_shift, softmax_gaussian_gradient
from fxrel.graphs import ops
from fxrel.graphs.analysis import cut_nodes
from fxrel.rules.factorization import factorize
from fxrel.ssl import neighbour_targets
from tests.helpers import object_masses, random_targets, rel_error, two_objects
from tests.strategies import cnn_architectures
from tests.test_models import build
from tests.test_rap import _grad, _pooled_z_rule, _sdiv, _z_beta


def small_net(classes: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.AvgPool2d(1),
                         nn.Flatten(), nn.Linear(72, 16), nn.ReLU(), nn.Linear(16, classes)).eval().double()


def _x(n: int = 2, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


#: the paper's score, gate and factorisation of the activations (the other defaults are the paper's too)
PAPER = dict(score="softmax_gaussian", gate="sigmoid", no_fx=False)
DEFAULT: dict = {}


def yhat_t(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Alg. 1 lines 2–3, as the official code writes it (autograd reference)."""
    y_t = logits.gather(1, targets[:, None])
    sigma = (logits - y_t).abs().max(1, keepdim=True)[0]
    return F.softmax(y_t * torch.exp(-0.5 * ((logits - y_t) / sigma) ** 2), 1).gather(1, targets[:, None])


def score_of(params: dict):
    """The score both streams start from: ŷ_t (the paper) or the logit y_t (the default)."""
    if params.get("score") == "softmax_gaussian":
        return yhat_t
    return lambda logits, targets: logits.gather(1, targets[:, None])


# --- §2 the initial attribution --------------------------------------------------------------------------------------
@given(logits=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=9),
       pick=st.integers(0, 8))
def test_closed_form_seed_is_the_autograd_gradient_of_the_softmax_gaussian_score(logits, pick):
    y = torch.tensor([logits], dtype=torch.float64)
    target = torch.tensor([pick % y.shape[1]])
    spread = (y - y[0, target]).abs()[0]
    if spread.max() == 0 or (spread == spread.max()).sum() > 1:
        return  # σ's gradient is ambiguous at ties; autograd picks one
    yv = y.clone().requires_grad_()
    (expected,) = torch.autograd.grad(yhat_t(yv, target).sum(), yv)
    got = softmax_gaussian_gradient(y, F.one_hot(target, y.shape[1]).double())
    assert torch.allclose(got, expected, atol=1e-12, rtol=1e-9)


def test_equal_logits_give_a_finite_seed():
    seed = softmax_gaussian_gradient(torch.ones(2, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)[:2])
    assert torch.isfinite(seed).all()


@pytest.mark.parametrize("params", [DEFAULT, PAPER], ids=["logit", "softmax_gaussian"])
def test_attribution_at_the_classifier_input_is_x_times_the_gradient_of_the_score(params):
    """§10.6: Φ at the last linear layer's input = X ⊙ ∂s/∂X (autograd; for ŷ_t through σ and y_t, nothing
    detached)."""
    net, x, targets = small_net(), _x(3), torch.tensor([1, 4, 0])
    explanation = fxrel.Explainer(net, "agf", **params).attribute(x, targets, stops=["10"])
    features = net[:11](x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(score_of(params)(net[11](features), targets).sum(), features)
    assert rel_error(explanation.relevance["10"], features * grad) < 1e-12


@pytest.mark.parametrize("params", [DEFAULT, PAPER], ids=["logit", "softmax_gaussian"])
def test_a_convolutional_classifier_gets_x_times_the_gradient_through_the_pooling_above_it(params):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).eval().double()
    x, targets = _x(2), torch.tensor([3, 0])
    explanation = fxrel.Explainer(net, "agf", **params).attribute(x, targets, stops=["1"])
    features = net[:2](x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(score_of(params)(net[2:](features), targets).sum(), features)
    assert rel_error(explanation.relevance["1"], features * grad) < 1e-12


# --- §10.1 conservation, §10.4 shift identity ------------------------------------------------------------------------
def conservation_error(explainer: fxrel.Explainer, x: torch.Tensor, targets: torch.Tensor) -> float:
    """max over the cut nodes at or below the classifier's input of |Σ Φ − Σ X⊙∇X|, relative to the largest mass
    Σ|Φ| the sweep carries (per image). Not relative to the total: the residual r is O(1) whatever the scale of Φ
    (F_x, F_∇x, M ∈ [0, 1]), so where ŷ_t saturates and Σ X⊙∇X is tiny, the sums are kept to the rounding of the
    O(1) terms (measured on a bias-free Inception-v3: Σ = 3.2e-11 carried by Σ|Φ| = 2.1e4)."""
    explanation = explainer.attribute(x, targets, stops=["*"])
    canonical = explainer.canonical_graph(x)
    layers = [n for n in canonical.graph.nodes if n.meta.get("fxrel_kind") in (ops.CONV, ops.LINEAR)]
    head_input = layers[-1].args[0]
    start = explanation.relevance[head_input.name].flatten(1).sum(1)
    below = list(canonical.graph.nodes)
    below = set(below[:below.index(head_input) + 1])
    cuts = [explanation.relevance[n.name].flatten(1) for n in cut_nodes(canonical) if n in below]
    mass = torch.stack([phi.abs().sum(1) for phi in cuts]).amax(0).clamp(min=1e-300)
    return max(((phi.sum(1) - start).abs() / mass).max().item() for phi in cuts)


@given(spec=cnn_architectures(bias=False))
@settings(max_examples=20, deadline=None)
def test_attribution_sum_is_kept_after_every_layer(spec):
    """Σ Φ^(n) = Σ Φ^(n−1) on sequential, residual, dense and inception nets: C conserves, the Δ-shift keeps Σ C,
    the z-rules and slicing conserve, forks sum — so every node all paths pass through carries Σ X⊙∇X. (Bias-free
    nets: a unit that a bias or BatchNorm shift turns on with all its inputs at zero has a zero denominator in C,
    and the relevance it holds is the bias's, §10.1.)"""
    model, x = spec.build()
    model, x = model.double(), x.double()
    assert conservation_error(fxrel.Explainer(model, "agf"), x, random_targets(model, x)) < 1e-8


def _bias_free(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
    return model


@pytest.mark.parametrize("source,name,size", [
    ("torchvision", "vgg16", 32), ("torchvision", "resnet50", 32), ("timm", "resnet50", 32),
    # 31 s and 24 s on 2 cores; concatenations and branches are property-tested on random architectures by default
    pytest.param("torchvision", "densenet121", 32, marks=pytest.mark.slow),
    pytest.param("torchvision", "inception_v3", 75, marks=pytest.mark.slow)])
def test_full_architectures_keep_the_sum_and_run_the_self_supervised_variant(source, name, size):
    """Bias-free VGG16, ResNet-50 (torchvision and timm blocks), DenseNet-121 and Inception-v3 (random weights,
    calibrated BatchNorm): Σ Φ kept at every node all paths pass through, to float64 rounding (measured ≤ 1e-16);
    batched; and Alg. 2 explains the class it picks."""
    model = _bias_free(build(source, name, size)).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    explainer = fxrel.Explainer(model, "agf")
    assert conservation_error(explainer, x, torch.tensor([1, 7])) < 1e-12
    references = torch.randn(4, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ssl = fxrel.explain(model, x, method="agf_ssl", references=references)
    targets = neighbour_targets(model, x, references)
    assert rel_error(ssl, explainer(x, targets)) < 1e-12 and torch.isfinite(ssl).all()


@given(values=st.lists(st.floats(-5, 5, allow_nan=False), min_size=12, max_size=12),
       residual=st.lists(st.floats(0, 3, allow_nan=False), min_size=12, max_size=12),
       zeros=st.lists(st.booleans(), min_size=12, max_size=12))
def test_delta_shift_keeps_the_sum_and_is_one_constant_on_the_support(values, residual, zeros):
    c = torch.tensor(values, dtype=torch.float64).where(~torch.tensor(zeros), torch.tensor(0.0, dtype=torch.float64))
    c, r = c.view(1, 3, 2, 2), torch.tensor(residual, dtype=torch.float64).view(1, 3, 2, 2) * (c.view(1, 3, 2, 2) != 0)
    phi = delta_shift(c, r)
    assert abs(phi.sum().item() - c.sum().item()) < 1e-9
    offset = (phi - (c + r))
    assert (offset[c == 0] == 0).all()
    if (c != 0).any():
        assert torch.allclose(offset[c != 0], offset[c != 0][0].expand((c != 0).sum()), atol=1e-12)


# --- §3 the factorization operator ---------------------------------------------------------------------------------
def _two_regions(c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A map whose left half shows one channel pattern and right half another, and the guide φ = ±1 there."""
    values = torch.zeros(1, c, 4, 6, dtype=torch.float64)
    values[:, : c // 2, :, :3] = 1.0
    values[:, c // 2:, :, 3:] = 1.0
    guide = torch.ones(1, 1, 4, 6, dtype=torch.float64)
    guide[..., 3:] = -1
    return values, guide


def test_factorization_recovers_a_clear_foreground_background_split():
    """Every pixel's soft-Heaviside vector is exactly one representative: plain least squares (λ = 0) gives the
    weights (w_b, w_f) = (0, 1) on the foreground and (1, 0) on the background, so F̄ = +1 / −1."""
    values, guide = _two_regions()
    f = factorize(values, guide, slope=10.0, ridge=0.0)
    assert torch.allclose(f[:, :, :, :3], torch.ones(1, 4, 4, 3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(f[:, :, :, 3:], -torch.ones(1, 4, 4, 3, dtype=torch.float64), atol=1e-9)


def test_factorization_with_ridge_matches_an_independent_solve():
    torch.manual_seed(1)
    values, guide = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 1, 3, 4, dtype=torch.float64)
    got = factorize(values, guide)
    for i in range(2):
        h = torch.sigmoid(10 * values[i] / values[i].max()).flatten(1)            # [C, HW]
        fg, bg = (guide[i] > 0).flatten().double(), (guide[i] < 0).flatten().double()
        r = torch.stack([(h * bg).sum(1) / bg.sum(), (h * fg).sum(1) / fg.sum()], 1)   # [C, 2]
        w = torch.linalg.solve(r.T @ r + torch.eye(2, dtype=torch.float64), r.T @ h).clamp(min=0)
        assert torch.allclose(got[i, 0].flatten(), w[1] - w[0], atol=1e-10)
        assert torch.equal(got[i, 0], got[i, -1])  # broadcast over the channels


@pytest.mark.parametrize("case", ["all foreground", "all background", "all zero", "no guide"])
@pytest.mark.parametrize("ridge", [1.0, 0.0])
def test_factorization_of_degenerate_inputs_is_finite(case, ridge):
    values, guide = _two_regions()
    if case == "all foreground":
        guide = guide.abs()
    elif case == "all background":
        guide = -guide.abs()
    elif case == "all zero":
        values = torch.zeros_like(values)
    else:
        guide = torch.zeros_like(guide)
    assert torch.isfinite(factorize(values, guide, ridge=ridge)).all()


# --- §10 class specificity ------------------------------------------------------------------------------------------
def test_map_for_a_class_puts_more_positive_mass_on_its_own_object():
    """Object B is dimmer (two equal logits would make σ = 0 and ŷ constant): B's map still favours B."""
    model, x = two_objects()
    x[:, 1] *= 0.7
    explainer = fxrel.Explainer(model, "agf")
    mass = {name: object_masses(explainer(x, target)) for name, target in (("A", 0), ("B", 1))}
    print(f"\nAGF relevance (on A, on B, positive share on A): class A {mass['A']}, class B {mass['B']}")
    assert mass["A"][0] > mass["B"][0] and mass["B"][1] > mass["A"][1]
    assert mass["A"][2] > 0.9 and mass["B"][2] < 0.1
    assert mass["A"][1] < 0 and mass["B"][0] < 0  # the other object is negative evidence (Δ-shift bipolarity)


# --- the literal per-layer implementation ---------------------------------------------------------------------------
def _literal_factorization(values: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    h = torch.sigmoid(10 * _sdiv(values, values.amax((1, 2, 3), keepdim=True)))
    fg, bg = (guide > 0).double(), (guide < 0).double()
    r_f = _sdiv((h * fg).sum((2, 3)), fg.sum((1, 2, 3))[:, None])
    r_b = _sdiv((h * bg).sum((2, 3)), bg.sum((1, 2, 3))[:, None])
    r = torch.stack([r_b, r_f], 2)                                                   # [N, C, 2]
    rt = r.transpose(1, 2)
    w = torch.linalg.solve(rt @ r + torch.eye(2, dtype=r.dtype), rt @ h.flatten(2)).clamp(min=0)
    return (w[:, 1:2] - w[:, 0:1]).view(guide.shape).expand_as(values).clamp(min=0)


def _influence(f, weight, x, phi, ones=False):
    """G(|x| or 1, |W|, Φ) by autograd, as the official code computes C and A."""
    xa = (torch.ones_like(x) if ones else x.abs()).detach().requires_grad_()
    z = f(xa, weight.abs()) * (phi != 0).double()
    return (xa * _grad(z, xa, _sdiv(phi, z))).detach()


def _shift(c, r):
    nonzero = (c != 0).double()
    return c + r - _sdiv(r.sum(), nonzero.sum()) * nonzero


def _m(x, grad, support=None):
    m = F.relu((x * grad).mean(1, keepdim=True)).expand_as(x)
    m = m if support is None else m * support
    return _sdiv(m, m.max())


def _conv_full(conv, a, phi, grad_in, grad_out, paper=True):
    """Eq. 9–14 (``paper``: Eq. 13 as written, ``r = 1[C≠0](A + F_∇x + (F_x + M)·sigmoid(C))``; otherwise the
    defaults, ``r = 1[C>0](A + F_∇x + M)``)."""
    def f(v, w):
        return F.conv2d(v, w, None, conv.stride, conv.padding)
    m = _m(a, grad_in)
    xr = a.detach().requires_grad_()
    masked = _grad(conv(xr) * (phi != 0).double(), xr, grad_out)
    c = _influence(f, conv.weight, a, phi)
    guide = c.mean(1, keepdim=True)
    f_x, f_dx = _literal_factorization(a, guide), _literal_factorization(masked, guide)
    a_term = _influence(f, conv.weight, a, phi, ones=True)
    if paper:
        return _shift(c, ((f_x + m) / (1 + torch.exp(-c)) + f_dx + a_term) * (c != 0).double())
    return _shift(c, (m + f_dx + a_term) * (c > 0).double())


def agf_reference(net: nn.Sequential, x: torch.Tensor, target: int, params: dict = PAPER) -> torch.Tensor:
    """AGF of one image, layer by layer as in the official code (agf.md §2–4) or with the defaults; the gradient
    stream by autograd."""
    acts = [x.detach().requires_grad_()]
    for m in net:
        acts.append(m(acts[-1]))
        acts[-1].retain_grad()
    score_of(params)(acts[-1], torch.tensor([target])).sum().backward()
    grads = [a.grad for a in acts]
    head = len(net) - 1
    phi = (acts[head] * grads[head]).detach()
    for i in reversed(range(head)):
        m, a = net[i], acts[i].detach()
        if isinstance(m, nn.Linear):
            c = _influence(F.linear, m.weight, a, phi)
            if isinstance(net[i - 1], nn.Flatten):
                shape = acts[i - 1].shape
                mm = _m(a.view(shape), grads[i].view(shape), (c != 0).double().view(shape)).reshape(a.shape)
                c = _shift(c, mm)
            phi = c
        elif isinstance(m, nn.Conv2d) and i == 0:
            phi = _z_beta(m, a, phi)
        elif isinstance(m, nn.Conv2d):
            phi = _conv_full(m, a, phi, grads[i], grads[i + 1], paper=params is PAPER)
        elif isinstance(m, nn.ReLU):
            phi = phi * (a > 0).double()
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            phi = _pooled_z_rule(m, a, phi)
        elif isinstance(m, nn.Flatten):
            phi = phi.reshape(a.shape)
    return phi


@pytest.mark.parametrize("params", [DEFAULT, PAPER], ids=["default", "paper"])
def test_explicit_graph_equals_the_literal_per_layer_equations(params):
    net, x = small_net(), _x(3)
    targets = [1, 3, 0]
    graph = fxrel.Explainer(net, "agf", **params)(x, targets)
    reference = torch.cat([agf_reference(net, x[i:i + 1], t, params) for i, t in enumerate(targets)])
    assert rel_error(graph, reference) < 1e-10


class _Block(nn.Module):
    """A BasicBlock without BatchNorm: conv1 (full) → ReLU → conv2 (flat: it feeds the sum) + skip, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


@pytest.mark.parametrize("official", [True, False], ids=["official", "default"])
def test_residual_net_equals_the_literal_equations(official):
    """Stem z^β, a block and a summed fork. The official code: conv1 full, conv2 flat (it feeds the sum), the signed
    z-split at the sum, ŷ_t; the defaults: both convs full, the absolute split ``|a| / Σ|·| · Φ``, y_t."""
    torch.manual_seed(2)
    stem, block, head = nn.Conv2d(3, 4, 3, padding=1), _Block(4), nn.Linear(4, 3)
    net = nn.Sequential(stem, nn.ReLU(), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval().double()
    x, target = _x(1, 6), 2
    params = dict(residual="official", flat="official", **PAPER) if official else DEFAULT
    graph = fxrel.Explainer(net, "agf", **params)(x, target)

    s = torch.relu(stem(x)).detach().requires_grad_()
    pre1 = block.conv1(s)
    h = torch.relu(pre1)
    pre2 = block.conv2(h)
    summed = pre2 + s
    out = torch.relu(summed)
    pooled = out.mean((2, 3))
    for t in (pre1, h, pre2, pooled):
        t.retain_grad()
    score_of(params)(head(pooled), torch.tensor([target])).sum().backward()
    grad_pre1, grad_h, grad_pre2 = pre1.grad, h.grad, pre2.grad
    pre1, h, pre2, summed, out = (t.detach() for t in (pre1, h, pre2, summed, out))
    phi = pooled.detach() * pooled.grad                                              # Eq. 8 at the classifier
    phi = _pooled_z_rule(lambda t: t.mean((2, 3)), out, phi)                          # average pooling: z-rule
    phi = phi * (summed > 0).double()                                                 # ReLU
    if official:                                                                      # signed z-split at the sum
        to_branch, to_skip = pre2 * _sdiv(phi, summed), s.detach() * _sdiv(phi, summed)
        phi = _influence(lambda v, w: F.conv2d(v, w, None, 1, 1), block.conv2.weight, h, to_branch)  # conv2: flat
    else:                                                                             # absolute split at the sum
        share = _sdiv(phi, pre2.abs() + s.detach().abs())
        to_branch, to_skip = pre2.abs() * share, s.detach().abs() * share
        phi = _conv_full(block.conv2, h, to_branch, grad_h, grad_pre2, paper=False)     # conv2: full (h feeds it only)
    phi = phi * (pre1 > 0).double()                                                   # ReLU
    sr = s.detach().requires_grad_()
    grad_in = _grad(block.conv1(sr), sr, grad_pre1)                                    # ∇x of conv1 alone
    phi = _conv_full(block.conv1, s.detach(), phi, grad_in, grad_pre1, paper=official) + to_skip  # conv1; fork: sum
    phi = phi * (stem(x) > 0).double()                                                # ReLU
    reference = _z_beta(stem, x, phi.detach())
    assert rel_error(graph, reference) < 1e-10


# --- ablations, batching, compiling, registry ---------------------------------------------------------------------
def test_every_ablation_and_flat_all_reduces_to_absolute_influence():
    """§10.5: with every switch and flat="all", AGF is absolute-influence LRP seeded with X⊙∂s/∂X."""
    net, x = small_net(), _x(2)
    switches = dict(no_a=True, no_fx=True, no_fdx=True, no_m=True)
    flat = fxrel.Explainer(net, "agf", flat="all")(x, [1, 2])
    ablated = fxrel.Explainer(net, "agf", **switches)(x, [1, 2])
    full = fxrel.Explainer(net, "agf")(x, [1, 2])
    assert rel_error(ablated, flat) > 1e-3  # the linear layer after the flatten still adds M
    assert rel_error(full, flat) > 1e-3
    defaults = fxrel.methods(detail=True)["agf"]["defaults"]
    for switch in ("no_a", "no_fx", "no_fdx", "no_m", "no_reg", "gradcam"):
        variant = fxrel.Explainer(net, "agf", **{switch: not defaults[switch]})(x, [1, 2])
        assert rel_error(variant, full) > 1e-6, switch
        assert abs(variant.sum().item() - full.sum().item()) < 1e-9 * abs(full.sum().item()) + 1e-12, switch


def test_batched_equals_per_image():
    net, x = small_net(), _x(3)
    targets = [4, 0, 2]
    batched = fxrel.Explainer(net, "agf")(x, targets)
    single = torch.cat([fxrel.explain(net, x[i:i + 1], t, method="agf") for i, t in enumerate(targets)])
    assert rel_error(batched, single) < 1e-12


def test_normalize_divides_by_the_per_sample_maximum():
    net, x = small_net(), _x(2)
    raw = fxrel.Explainer(net, "agf")(x, [1, 2])
    scaled = fxrel.Explainer(net, "agf", normalize=True)(x, [1, 2])
    assert torch.allclose(scaled.flatten(1).amax(1), torch.ones(2, dtype=torch.float64))
    assert rel_error(scaled * raw.flatten(1).amax(1).view(-1, 1, 1, 1), raw) < 1e-12


@pytest.mark.slow
def test_compiled_equals_eager():
    net, x = small_net(), _x(2)
    eager = fxrel.Explainer(net, "agf")(x, [1, 3])
    assert rel_error(fxrel.Explainer(net, "agf", compile=True)(x, [1, 3]), eager) < 1e-10


def test_registered_with_its_options():
    entry = fxrel.methods(detail=True)["agf"]
    assert entry["defaults"]["slope"] == 10.0 and entry["defaults"]["ridge"] == 1.0
    assert "Gur" in entry["reference"]
    assert {k: entry["defaults"][k] for k in ("score", "gate", "no_fx", "flat")} == dict(
        score="logit", gate="sign", no_fx=True, flat="paper")
    for bad in (dict(flat="some"), dict(residual="signed"), dict(background="zero"), dict(ridge=-1.0),
                dict(slope=0.0), dict(score="softmax"), dict(gate="step")):
        with pytest.raises(fxrel.RuleError, match=next(iter(bad))):
            fxrel.Explainer(small_net(), "agf", **bad)


# --- Alg. 2: the self-supervised variant ---------------------------------------------------------------------------
def test_self_supervised_target_is_the_class_of_the_latent_minus_its_nearest_neighbour():
    net, x, references = small_net(), _x(3), _x(6, 12) * 0.5 + 0.3
    with torch.no_grad():
        own, pool = net[:11](x), net[:11](references)
        nearest = pool[torch.cdist(own, pool).argmin(1)]
        expected = {"difference": net[11](own - nearest).argmax(1), "sum": net[11](own + nearest).argmax(1),
                    "none": net(x).argmax(1)}
    for combine, targets in expected.items():
        assert torch.equal(neighbour_targets(net, x, references, combine), targets), combine
    assert torch.equal(neighbour_targets(net, x, pool), expected["difference"])  # latents given directly
    got = fxrel.explain(net, x, method="agf_ssl", references=references)
    assert rel_error(got, fxrel.Explainer(net, "agf")(x, expected["difference"])) < 1e-12


def test_self_supervised_variant_skips_the_image_itself_among_the_references():
    net, x = small_net(), _x(3)
    references = torch.cat([x, _x(4, 12) + 1.0])
    with torch.no_grad():
        own, pool = net[:11](x), net[:11](references[3:])
        expected = net[11](own - pool[torch.cdist(own, pool).argmin(1)]).argmax(1)
    assert torch.equal(neighbour_targets(net, x, references), expected)
    with pytest.raises(fxrel.InputError, match="no reference other than itself"):
        neighbour_targets(net, x[:1], x[:1])


def test_self_supervised_variant_rejects_bad_input():
    net, x = small_net(), _x(2)
    with pytest.raises(fxrel.InputError, match="target"):
        fxrel.explain(net, x, 3, method="agf_ssl", references=x)
    with pytest.raises(fxrel.InputError, match="references"):
        fxrel.explain(net, x, method="agf_ssl")
    with pytest.raises(fxrel.InputError, match="combine"):
        neighbour_targets(net, x, x, "mean")
    with pytest.raises(fxrel.InputError, match="features"):
        neighbour_targets(net, x, torch.randn(4, 7, dtype=torch.float64))
    conv_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten()).eval().double()
    with pytest.raises(fxrel.InputError, match="linear classifier"):
        neighbour_targets(conv_head, x, x)
