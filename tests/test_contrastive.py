"""CLRP (Gu et al. 2018) and SGLRP (Iwana et al. 2019): the invariants of specs/clrp.md §6 and specs/sglrp.md §5,
and the discriminativeness CLRP was made for, measured on a constructed two-object case."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrel
from fxrel.catalog.contrastive import lrp_preset, seed_sglrp_dual, seed_sglrp_target
from fxrel.catalog.method import Method, seed_logit
from tests.helpers import random_targets, rel_error
from tests.strategies import cnn_architectures


class SmallVGG(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SmallVGG().eval()


def _x(n=2):
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 4 - 2


def test_agf_and_sglrp_combinations_sum_to_zero(net):
    x = _x()
    for method, params in (("clrp", {"combine": "agf"}), ("clrp", {"combine": "official"}), ("sglrp", {})):
        r = fxrel.Explainer(net, method, **params)(x, [1, 3]).flatten(1)
        assert (r.sum(1).abs() <= 1e-5 * r.abs().sum(1)).all(), (method, params)


def test_paper_combination_is_the_positive_part_of_the_difference(net):
    x = _x()
    streams = fxrel.Explainer(net, "clrp", combine="none").attribute(x, [1, 3]).relevance
    paper = fxrel.Explainer(net, "clrp")(x, [1, 3])
    assert torch.allclose(paper, torch.relu(streams["clrp:x"] - streams["clrp_dual:x"]), atol=1e-7)
    assert paper.min() >= 0


def test_clrp2_dual_is_lrp_of_the_model_with_its_last_layer_negated(net):
    x = _x()
    dual = fxrel.Explainer(net, "clrp", variant=2, combine="none").attribute(x, [1, 3]).relevance["clrp_dual:x"]
    negated = copy.deepcopy(net)
    negated.classifier[3].weight.data.neg_()
    negated.classifier[3].bias.data.neg_()
    method = Method("preset", lrp_preset("zplus_box"), seed_logit)
    mask = torch.zeros(2, 5)
    mask[0, 1] = mask[1, 3] = -1.0  # LRP starts from y'·seed with y' = −y: this seeds the dual with +y_t
    reference = fxrel.Explainer(negated, method)(x, seed=mask)
    assert rel_error(dual, reference) < 1e-5


def test_clrp1_dual_is_the_uniform_mixture_of_the_other_classes(net):
    """Linearity (spec §6.4): the dual equals Σ_{k≠t} y_t/(C−1) · LRP(e_k), built class by class."""
    x = _x(1)
    dual = fxrel.Explainer(net, "clrp", combine="none").attribute(x, 2).relevance["clrp_dual:x"]
    y = net(x).detach()
    lrp = fxrel.Explainer(net, "lrp_zplus_box")
    reference = torch.zeros_like(x)
    for k in range(5):
        if k == 2:
            continue
        seed = torch.zeros(1, 5)
        seed[0, k] = y[0, 2] / 4 / y[0, k]  # seed_logit multiplies by y_k
        reference += lrp(x, seed=seed)
    assert rel_error(dual, reference) < 1e-5


def test_sglrp_seeds_carry_the_same_mass(net):
    """Spec §5.2: Σ_{n≠t} p_t p_n = p_t(1 − p_t); on a conserving preset both maps carry that mass."""
    x = _x()
    p = torch.softmax(net(x).detach(), 1)
    t = torch.tensor([1, 3])
    pt = p[torch.arange(2), t]
    mask = torch.nn.functional.one_hot(t, 5).float()
    assert torch.allclose(seed_sglrp_dual(net(x).detach(), mask).sum(1), pt * (1 - pt), atol=1e-7)
    assert torch.allclose(seed_sglrp_target(net(x).detach(), mask).sum(1), pt * (1 - pt) + 1e-8, atol=1e-7)
    streams = fxrel.Explainer(net, "sglrp", preset="zplus_box", scaling=False)
    both = fxrel.Explainer(net, "lrp_zplus_box")
    target = both(x, seed=mask * (pt * (1 - pt) + 1e-8).unsqueeze(1) / net(x).detach())
    dual = both(x, seed=seed_sglrp_dual(net(x).detach(), mask) / net(x).detach())
    assert rel_error(streams(x, t), target - dual) < 1e-5  # scaling=False: A^T − A^D, each its own LRP pass


def two_objects_model() -> nn.Module:
    """Feature a averages the left half of an 8×16 image, feature b the right half; both classes use both features:
    y_A = 1.0·a + 0.7·b, y_B = 0.7·a + 1.0·b. LRP for A therefore spreads over both objects; CLRP, which subtracts
    what A shares with B, should not."""
    features = nn.Linear(128, 2, bias=False)
    classifier = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        halves = torch.zeros(2, 8, 16)
        halves[0, :, :8] = 1 / 16
        halves[1, :, 8:] = 1 / 16
        features.weight.copy_(halves.flatten(1))
        classifier.weight.copy_(torch.tensor([[1.0, 0.7], [0.7, 1.0]]))
    return nn.Sequential(nn.Flatten(), features, nn.ReLU(), classifier).eval()


def _mass_on_left(r):
    positive = r.clamp(min=0).view(-1, 8, 16)
    return (positive[..., :8].sum() / positive.sum()).item()


def test_clrp_concentrates_on_the_target_object_where_lrp_does_not():
    x = torch.zeros(1, 8, 16)
    x[:, 2:6, 2:6] = 1.0     # object A (left)
    x[:, 2:6, 10:14] = 1.0   # object B (right)
    model = two_objects_model()
    lrp = fxrel.Explainer(model, "lrp_zplus_box", low=0.0, high=1.0)(x, 0)
    clrp = fxrel.Explainer(model, "clrp", low=0.0, high=1.0)(x, 0)
    sglrp = fxrel.Explainer(model, "sglrp", preset="zplus_box", low=0.0, high=1.0)(x, 0)
    lrp_left, clrp_left, sglrp_left = _mass_on_left(lrp), _mass_on_left(clrp), _mass_on_left(sglrp)
    print(f"\npositive mass on object A: LRP {lrp_left:.3f}, CLRP {clrp_left:.3f}, SGLRP {sglrp_left:.3f}")
    assert abs(lrp_left - 1 / 1.7) < 1e-4          # LRP: 1.0 : 0.7 between the objects
    assert clrp_left > 0.999 and sglrp_left > 0.999  # the contrastive maps: all positive mass on A


def test_excitation_backprop_is_a_probability_at_every_layer():
    """MWP (Zhang et al. 2016): from a one-hot seed, the winning probabilities at any layer are ≥ 0 above the input
    and sum to 1 (each step renormalises over the positive contributions; no bias)."""
    torch.manual_seed(0)
    model = SmallVGG().eval()
    x = _x()
    stops = ["features.1", "features.4", "classifier.2"]
    relevance = fxrel.Explainer(model, "excitation_backprop", stops=stops)(x, [0, 4])
    for stop in stops:
        p = relevance[stop].flatten(1)
        assert p.min() >= 0, stop
        assert torch.allclose(p.sum(1), torch.ones(2), atol=1e-5), stop


def test_contrastive_excitation_is_the_difference_with_the_negated_classifier():
    torch.manual_seed(0)
    model = SmallVGG().eval()
    x = _x()
    c = fxrel.Explainer(model, "contrastive_excitation_backprop", stops=["features.4"])(x, [0, 4])
    target = fxrel.Explainer(model, "excitation_backprop", stops=["features.4"])(x, [0, 4])
    negated = copy.deepcopy(model)
    negated.classifier[3].weight.data.neg_()
    dual = fxrel.Explainer(negated, "excitation_backprop", stops=["features.4"])(x, [0, 4])
    assert rel_error(c, target - dual) < 1e-5
    assert c.flatten(1).sum(1).abs().max() < 1e-5  # both are probability distributions


@given(spec=cnn_architectures(), variant=st.sampled_from([1, 2]), combine=st.sampled_from(["agf", "official"]))
def test_scaled_contrasts_sum_to_zero_on_random_architectures(spec, variant, combine):
    """The scaled differences R − R_dual·ΣR/ΣR_dual and R/ΣR − R_dual/ΣR_dual sum to zero per image on any
    architecture (spec §6.1) — except where one map's relevance vanishes entirely (every output's positive
    contributions zero: z⁺ drops it), where the zero-sum guard leaves the other map's term alone. The paper's
    max(0, R − R_dual) does not conserve: that is its documented absence."""
    model, x = spec.build()
    targets = random_targets(model, x)
    params = dict(variant=variant, low=-4.0, high=4.0)
    streams = fxrel.Explainer(model, "clrp", combine="none", **params).attribute(x, targets).relevance
    target, dual = streams["clrp:x"].flatten(1), streams["clrp_dual:x"].flatten(1)
    r = fxrel.Explainer(model, "clrp", combine=combine, **params)(x, targets).flatten(1)
    assert torch.isfinite(r).all()
    for i in range(len(x)):
        if dual[i].sum() == 0:  # the guard: nothing to subtract
            expected = target[i] / (target[i].sum() if combine == "official" and target[i].sum() != 0 else 1)
            assert torch.allclose(r[i], expected, atol=1e-6)
        elif combine == "official" and target[i].sum() == 0:  # the target vanished: only −R_dual/ΣR_dual is left
            assert torch.allclose(r[i], -dual[i] / dual[i].sum(), atol=1e-6)
        else:
            scale = (target[i].abs().sum() if combine == "agf" else 1.0) + 1e-12
            assert r[i].sum().abs() <= 1e-4 * scale


@pytest.mark.parametrize("method,params", [("clrp", {"variant": 2}), ("sglrp", {}),
                                           ("contrastive_excitation_backprop", {})])
def test_contrastive_methods_compile_to_one_graph(net, method, params):
    x = _x()
    eager = fxrel.Explainer(net, method, **params)(x, [1, 3])
    compiled = fxrel.Explainer(net, method, compile=True, **params)(x, [1, 3])
    assert rel_error(compiled, eager) < 1e-5


def test_registry_lists_every_method_with_its_output_convention(net):
    catalogue = fxrel.methods(detail=True)
    for name in ("clrp", "sglrp", "excitation_backprop", "contrastive_excitation_backprop", "grad_cam",
                 "grad_cam_pp", "layer_cam", "integrated_gradients", "smoothgrad", "lrp_zplus_box", "lrp_rap"):
        entry = catalogue[name]
        assert entry["description"] and entry["reference"] and entry["output"], name
    x = _x()
    from fxrel.cam import cam
    assert torch.equal(fxrel.explain(net, x, [1, 3], method="grad_cam", layer="features.4"),
                       cam(net, x, [1, 3], layer="features.4"))
    # a CAM is a sweep: an explainer of its own, eager or compiled, with its rule plan
    explainer = fxrel.Explainer(net, "grad_cam", layer="features.4")
    assert torch.equal(explainer(x, [1, 3]), cam(net, x, [1, 3], layer="features.4"))
    assert all(repr(rule).startswith("Gradient") for rule in explainer.rule_plan(x).values())
    with pytest.raises(fxrel.RuleError, match="post-hoc method"):
        fxrel.Explainer(net, "ucag")


class _ResidualNet(nn.Module):
    """Bias-free conv → ReLU → (conv → ReLU → conv) + skip → ReLU → global average pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = torch.relu(a + self.conv2(torch.relu(self.conv1(a))))
        return self.fc(b.mean((2, 3)))


class _SignedPoolNet(nn.Module):
    """DenseNet's transition: an average pooling of a convolution's output with no ReLU in between (signed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.transition = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        pooled = F.avg_pool2d(self.transition(torch.relu(self.stem(x))), 2)
        return self.fc(torch.relu(pooled).mean((2, 3)))


@pytest.mark.parametrize("method", ["lrp_zplus_box", "lrp_rap", "lrp_deep_taylor"])
def test_absolute_split_of_a_signed_average_pooling_is_bounded_and_the_signed_one_amplifies(method):
    """``sums="absolute"`` (default): ``R_i = |x_i| / Σ_window |x| · R`` at the pooling — Σ|R| kept exactly and each
    unit at most its window's |R|; the signed z-rule (``sums="z_rule"``) sends ``x_i / Σ x`` of ``R`` where the window's
    signs are mixed, so Σ|R| grows. Both keep Σ R. (CLRP and SGLRP run these presets in both of their streams.)"""
    model = _SignedPoolNet().eval().double()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    amplification = {}
    for sums in ("absolute", "z_rule"):
        explanation = fxrel.Explainer(model, method, sums=sums).attribute(x, [0, 2], stops=["*"])
        pool = next(n for n in explanation.relevance if n.startswith("avg_pool"))
        conv = next(n for n in explanation.relevance if n.startswith("convolution") and n.endswith("_1"))
        r_out, r_in, a = explanation.relevance[pool], explanation.relevance[conv], explanation.values[conv]
        assert rel_error(r_in.flatten(1).sum(1), r_out.flatten(1).sum(1)) < (1e-12 if sums == "absolute" else 1e-6)
        if sums == "absolute":
            literal = a.abs() / F.avg_pool2d(a.abs(), 2).repeat_interleave(2, 2).repeat_interleave(2, 3) / 4 * \
                r_out.repeat_interleave(2, 2).repeat_interleave(2, 3)
            assert rel_error(r_in, literal) < 1e-10
        amplification[sums] = float(r_in.abs().sum() / r_out.abs().sum())
    assert abs(amplification["absolute"] - 1) < 1e-10 < amplification["z_rule"] - 1


@pytest.mark.parametrize("preset", ["zplus_box", "deep_taylor"])
@pytest.mark.parametrize("sums", ["absolute", "z_rule"])
def test_presets_split_residual_sums_and_pooling_and_conserve(preset, sums):
    """``sums="absolute"`` (default) and ``"z_rule"``: Σ R at the input equals the relevance the classifier layer
    received (the logit for z⁺; for w² too, which conserves) on a bias-free residual net. ``sums="official"``:
    deep-Taylor's gradient mapping copies R to both operands of the sum (Σ R grows), CLRP's uniform average pooling
    spreads a channel's relevance evenly over the map whatever its activations (the map differs from the split's)."""
    model = _ResidualNet().eval().double()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = torch.tensor([0, 2, 3])
    logits = model(x).gather(1, targets[:, None])[:, 0]
    method = f"lrp_{preset}"
    z = fxrel.Explainer(model, method, sums=sums)(x, targets).flatten(1).sum(1)
    assert rel_error(z, logits) < 1e-6   # the presets' 1e-9 stabiliser
    official = fxrel.Explainer(model, method, sums="official")(x, targets)
    default = fxrel.Explainer(model, method, sums=sums)(x, targets)
    assert rel_error(official, default) > 1e-3
    if preset == "deep_taylor":
        # the skip and the branch both got R at the one residual sum: Σ R doubles
        assert rel_error(official.flatten(1).sum(1), 2 * logits) < 1e-6
    with pytest.raises(fxrel.RuleError, match="unknown sums"):
        fxrel.Explainer(model, method, sums="nope")(x, targets)
