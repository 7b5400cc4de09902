"""float16 / bfloat16 models: every method's map is finite and follows the float32 map of the same weights.

Stabilisers are absolute constants (1e-20 in excitation backprop, 1e-9 in the contrastive presets and RSP, 1e-6 in
the LRP rules); in float16 they underflow (``0/0`` → NaN) or are subnormal (``R/ε`` → ``inf``, ``inf·0`` → NaN).
The rules raise them to ``finfo(dtype).tiny`` there (:func:`fxrel.rules.generic.stabilizer_for`). Before, eleven
method × model pairs were NaN in float16 (excitation backprop, c-MWP and c*RSP on both nets; CLRP, SGLRP,
``lrp_zplus_box``, ``lrp_rap`` and ``lrp_deep_taylor`` on the ResNet); bfloat16 has float32's range and was finite.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import fxrel
from fxrel.demo.models import BasicBlock, conv_bn_relu
from fxrel.rules.generic import stabilize, stabilizer_for

METHODS = sorted(set(fxrel.methods()) - {"agf_ssl"})   # agf_ssl needs reference images
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: the nets each dtype runs on: bfloat16 (float32's range: never NaN before) on the ResNet only, to keep the file short
MODELS = {"float16": ("vgg", "resnet"), "bfloat16": ("resnet",)}

#: Pearson r between the low-precision and the float32 map, per image (the minimum over the batch). Measured
#: minima: VGG 0.9984 (AGF, float16; 0.9865 in bfloat16, not run here), ResNet 0.9611 (``epsilon_alpha2_beta1_flat``,
#: float16: its float32 map moves as much, 0.9635, when ε goes from 1e-6 to float16's 6.1e-5) apart from the maps
#: below.
R_MIN = 0.9
#: (model, method) → dtypes whose map is not asserted to correlate: the maps are ill-conditioned on this ResNet, not
#: broken. ``lrp_flat``/``lrp_wsquare`` ignore the input, and their signed z-rule at the residual sums divides by
#: nearly cancelling operands: the float32 map of the weights merely *rounded* to float16 (computed in float32)
#: already correlates 0.23 / −0.87 with the float32 map. α2β1 (``lrp_alpha_beta``, ``epsilon_alpha2_beta1_flat``)
#: and ``lrp_deep_taylor``'s w² classifier amplify bfloat16's 8-bit rounding at those sums (r 0.13 / 0.08 / 0.88,
#: the same against the float32 map of the rounded weights: arithmetic, not weights); in float16 they stay ≥ 0.96.
ILL_CONDITIONED = {("resnet", "lrp_flat"): ("float16", "bfloat16"), ("resnet", "lrp_wsquare"): ("float16", "bfloat16"),
                   ("resnet", "lrp_alpha_beta"): ("bfloat16",),
                   ("resnet", "epsilon_alpha2_beta1_flat"): ("bfloat16",),
                   ("resnet", "lrp_deep_taylor"): ("bfloat16",)}


class SmallVGG(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, an identity BasicBlock and a strided one (1×1 projection shortcut), GAP, linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(3, 8), BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@functools.cache
def _model(name: str) -> nn.Module:
    if name == "vgg":
        torch.manual_seed(0)
        return SmallVGG().eval()
    torch.manual_seed(1)
    net = SmallResNet()
    g = torch.Generator().manual_seed(5)
    for m in net.modules():   # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 4 - 2
TARGETS = torch.tensor([1, 3])


@functools.cache
def _explain(model: str, method: str, dtype: str) -> torch.Tensor:
    dt = getattr(torch, dtype)
    net = copy.deepcopy(_model(model)).to(dt)
    torch.manual_seed(0)   # smoothgrad's noise
    return fxrel.explain(net, X.to(dt), TARGETS, method=method)


def _pearson(low: torch.Tensor, ref: torch.Tensor) -> list[float | None]:
    """Per-image Pearson r (None where the float32 map is constant)."""
    a, b = low.double().flatten(1), ref.double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return [None if nb == 0 else float((x * y).sum() / (x.norm() * nb)) if x.norm() > 0 else 0.0
            for x, y, nb in zip(a, b, b.norm(dim=1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_finite_in_low_precision(method, dtype):
    for model in MODELS[dtype]:
        assert torch.isfinite(_explain(model, method, "float32")).all()
        low = _explain(model, method, dtype)
        assert low.dtype == DTYPES[dtype], (model, low.dtype)
        assert torch.isfinite(low).all(), model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_maps_follow_the_float32_map(method, dtype):
    for model in MODELS[dtype]:
        if dtype in ILL_CONDITIONED.get((model, method), ()):
            continue
        low, ref = _explain(model, method, dtype), _explain(model, method, "float32")
        for i, r in enumerate(_pearson(low, ref)):
            if r is None:   # a constant float32 map (Grad-CAM's ReLU of a negative map): the same constant
                assert torch.allclose(low[i].float(), ref[i], atol=1e-3 * float(ref.abs().max())), (model, i)
            else:
                assert r > R_MIN, (model, i, r)


def test_stabilisers_are_raised_only_where_they_underflow():
    for eps in (1e-20, 1e-9, 1e-8, 1e-6, 1e-2):
        for dt in (torch.float32, torch.float64, torch.bfloat16):   # every stabiliser in use is exact here
            assert stabilizer_for(eps, dt) == eps
        assert stabilizer_for(eps, torch.float16) == max(eps, torch.finfo(torch.float16).tiny)
        assert stabilizer_for(eps, None) == eps
    assert stabilizer_for(0.0, torch.float16) == 0.0   # sdiv stays zero-safe division
    assert stabilizer_for(1e-6, torch.float16, normal=False) == 1e-6   # representable (subnormal): kept
    assert stabilizer_for(1e-9, torch.float16, normal=False) == 2.0 ** -24


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stabilize_is_z_plus_epsilon_signed_with_sign_of_zero_plus_one_bit_for_bit(dtype):
    """``stab(z) = z + ε'·sign(z)``, ``sign(±0) = +1`` (zennit's convention), is the literal ``where`` form bit for bit
    — signed zeros, subnormals, ±inf and NaN included — eagerly and in a traced graph."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny * info.eps, -info.tiny * info.eps, 1.0,
                            -1.0, info.max, -info.max, float("inf"), -float("inf"), float("nan")], dtype=dtype)
    z = torch.cat([special, torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)])
    for eps in (1e-6, 1e-2):
        step = stabilizer_for(eps, dtype)
        literal = torch.where(z >= 0, z + step, z - step)
        traced = torch.fx.symbolic_trace(lambda t: stabilize(t, eps, dtype))   # noqa: B023 (traced at once)
        for ours in (stabilize(z, eps), traced(z)):
            assert ours.dtype == dtype
            assert torch.equal(ours.nan_to_num(0.0), literal.nan_to_num(0.0))
            assert torch.equal(torch.signbit(ours), torch.signbit(literal))
            assert torch.equal(ours.isnan(), literal.isnan())


def test_a_dead_unit_is_finite_in_float16():
    """A unit whose z⁺ denominator is exactly 0 (no positive input) but whose bias makes it live: before, 1e-20 and
    1e-9 rounded to 0 in float16 and ``R/0`` went on as NaN."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, 0.0]))
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.rand(1, 1, 2, 2) + 0.1
    for method in ("excitation_backprop", "contrastive_excitation_backprop", "clrp", "lrp_zplus_box"):
        ref = fxrel.explain(net, x, 0, method=method)
        low = fxrel.explain(copy.deepcopy(net).half(), x.half(), 0, method=method)
        assert torch.isfinite(low).all() and torch.isfinite(ref).all(), method
