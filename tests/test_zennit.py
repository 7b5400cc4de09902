"""Cross-check fxrel's LRP composites against zennit on torchvision VGG-16 and ResNet-50 (random weights).

zennit is a test-only dependency. Criterion (from the issue): ``max|R_fxrel − R_zennit| ≤ 1e-4 · max|R_zennit|``
for a batch of two images with a different target per row, explained twice (targets swapped).

About the BatchNorm merge on zennit's side: zennit's ``MergeBatchNorm`` folds a BatchNorm into the preceding conv
and then turns the BatchNorm into "the identity" by setting ``running_mean=0, running_var=1, weight=1, bias=0`` --
but it leaves ``eps`` in place, so every neutralised BatchNorm still computes ``x / sqrt(1 + eps)``, i.e. scales its
input by ``1 − 5e-6`` (``eps=1e-5``). ResNet-50 has 53 BatchNorms (49 on the longest path), so zennit's canonised
ResNet-50 is no longer the model: its activations drift by ~5e-6 per BatchNorm (measured on the model below,
relative to the model's own forward pass: 6.5e-5 after layer1, 4.9e-4 after layer4, 2.9e-4 on the logits; with
``eps = 0``: 1.8e-6, 1.5e-5, 5.0e-6; fxrel's folded logits: 4.5e-6), and its relevance differs from fxrel's by
1.3e-3 to 1.7e-3 × max|R|, far over the 1e-4 tolerance. fxrel folds BatchNorm exactly.
We therefore compare against zennit with :class:`ExactMergeBatchNorm`: zennit's own canonizer plus ``eps = 0`` while
merged (restored on removal), so that zennit's forward pass is the model's. The stock canonizer's ratio is printed
alongside, for information (run with ``-s``).
VGG-16 has no BatchNorm, so there the stock ``SequentialMergeBatchNorm`` is used unchanged.

In float32 the remaining difference is rounding, amplified by LRP's divisions (on random ResNet-50s both
implementations are 1e-6 to 4e-5 × max|R| away from their own float64 result, and from each other); in float64 the two
agree to ~1e-13, which :func:`test_matches_zennit_float64` checks with a tolerance of 1e-9.
"""
from __future__ import annotations

import copy

import pytest
import torch

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import DeconvNet, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat, GuidedBackprop  # noqa: E402
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer  # noqa: E402

import fxrel  # noqa: E402
from fxrel.random_weights import calibrate_batchnorm  # noqa: E402
from fxrel.rules import bounds_from_normalization  # noqa: E402

TOLERANCE = 1e-4
SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TARGETS = ((3, 417), (417, 3))   # two different targets per batch (one per row), then swapped


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's ``SequentialMergeBatchNorm`` that also sets the merged BatchNorm's ``eps`` to 0, so the neutralised
    BatchNorm is exactly the identity (zennit leaves ``eps``, so it computes ``x / sqrt(1 + eps)``)."""

    def register(self, linears, batch_norm):
        super().register(linears, batch_norm)
        self.saved_eps, batch_norm.eps = batch_norm.eps, 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self.saved_eps


def exact_resnet_canonizer() -> CompositeCanonizer:
    """``zennit.torchvision.ResNetCanonizer`` with :class:`ExactMergeBatchNorm` in place of the stock merge."""
    return CompositeCanonizer((ExactMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    built = {"vgg16": torchvision.models.vgg16(weights=None).eval(),
             "resnet50": torchvision.models.resnet50(weights=None)}
    calibrate_batchnorm(built["resnet50"], SIZE, seed=1, bias_std=0.2, perturb=0.1)
    for model in built.values():
        model.requires_grad_(False)
    return built


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Two normalised 'images' (uniform pixels in [0, 1], ImageNet normalisation), inside the ZBox bounds."""
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def models64(models) -> dict[str, torch.nn.Module]:
    return {name: copy.deepcopy(model).double() for name, model in models.items()}


def _zennit_relevance(model, composite, x, target) -> tuple[torch.Tensor, torch.Tensor]:
    """zennit relevance seeded like fxrel's LRP methods: ``R = y_t · e_t`` at the logits."""
    onehot = torch.zeros(x.shape[0], 1000, dtype=x.dtype)
    onehot[torch.arange(x.shape[0]), target] = 1.0
    with Gradient(model=model, composite=composite) as attributor:
        output, relevance = attributor(x.clone(), lambda y: y.detach() * onehot)
    return output.detach(), relevance.detach()


def _composites(composite: str):
    """(fxrel method name, fxrel parameters, factory of zennit composites given a canonizer list)."""
    if composite == "epsilon_plus_flat":
        return "epsilon_plus_flat", {}, lambda canonizers: EpsilonPlusFlat(canonizers=canonizers)
    if composite == "epsilon_alpha2_beta1_flat":
        return composite, {}, lambda canonizers: EpsilonAlpha2Beta1Flat(canonizers=canonizers)
    low, high = bounds_from_normalization(MEAN, STD)
    return ("epsilon_gamma_box", {"low": low, "high": high},
            lambda canonizers: EpsilonGammaBox(low=low.view(1, 3, 1, 1), high=high.view(1, 3, 1, 1),
                                               canonizers=canonizers))


def _canonizers(model_name: str) -> list:
    return [SequentialMergeBatchNorm()] if model_name == "vgg16" else [exact_resnet_canonizer()]


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
@pytest.mark.parametrize("model_name", ["vgg16", "resnet50"])
def test_matches_zennit(models, batch, model_name, composite):
    """The issue's criterion, in float32: max|ΔR| ≤ 1e-4 · max|R|."""
    model = models[model_name]
    method, params, zennit_composite = _composites(composite)
    explainer = fxrel.Explainer(model, method, **params)
    canonizers = _canonizers(model_name)
    stock = [ResNetCanonizer()] if model_name == "resnet50" else None

    for target in TARGETS:
        target = torch.tensor(target)
        ours = explainer.attribute(batch, target)
        r_ours = next(iter(ours.relevance.values()))
        z_out, r_zennit = _zennit_relevance(model, zennit_composite(canonizers), batch, target)
        assert r_ours.shape == batch.shape
        assert torch.isfinite(r_ours).all()

        scale = r_zennit.abs().max().item()
        ratio = (r_ours - r_zennit).abs().max().item() / scale
        rows = torch.arange(2)
        logits = z_out[rows, target]
        note = ""
        if stock is not None and target.tolist() == list(TARGETS[0]):   # informational, once per test
            _, r_stock = _zennit_relevance(model, zennit_composite(stock), batch, target)
            note = f"  (zennit stock canonizer: {(r_ours - r_stock).abs().max().item() / scale:.3g})"
        print(f"\n[{model_name} / {composite} / targets {target.tolist()}] max|ΔR| / max|R| = {ratio:.3g}{note}; "
              f"ΣR/logit fxrel {(r_ours.flatten(1).sum(1) / logits).tolist()} "
              f"zennit {(r_zennit.flatten(1).sum(1) / logits).tolist()}")
        # both explain the same forward pass
        torch.testing.assert_close(ours.output[rows, target], logits, rtol=1e-5, atol=1e-5 * logits.abs().max())
        assert ratio <= TOLERANCE, (f"{model_name}/{composite} targets {target.tolist()}: max abs difference "
                                    f"{ratio:.3g} × max|R| exceeds {TOLERANCE:g}")


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"])
@pytest.mark.parametrize("model_name", ["vgg16", "resnet50"])
def test_matches_zennit_float64(models64, batch, model_name, composite):
    """In float64 rounding is out of the way: the two must then agree to ~machine precision (measured ≤ 2e-13)."""
    model, x, target = models64[model_name], batch.double(), torch.tensor(TARGETS[0])
    method, params, zennit_composite = _composites(composite)
    r_ours = fxrel.Explainer(model, method, **params)(x, target)
    _, r_zennit = _zennit_relevance(model, zennit_composite(_canonizers(model_name)), x, target)
    assert r_ours.dtype == torch.float64
    ratio = (r_ours - r_zennit).abs().max().item() / r_zennit.abs().max().item()
    print(f"\n[float64 {model_name} / {composite}] max|ΔR| / max|R| = {ratio:.3g}")
    assert ratio <= 1e-9


@pytest.mark.parametrize("method,composite", [("guided_backprop", GuidedBackprop), ("deconvnet", DeconvNet)])
def test_gradient_family_matches_zennit(models64, batch, method, composite):
    """Guided backprop and DeconvNet (modified ReLU gradients) against zennit's composites, float64, VGG-16."""
    model, x, target = models64["vgg16"], batch.double(), torch.tensor(TARGETS[0])
    ours = fxrel.Explainer(model, method)(x, target)
    onehot = torch.zeros(2, 1000, dtype=x.dtype)
    onehot[torch.arange(2), target] = 1.0
    with Gradient(model=model, composite=composite()) as attributor:
        _, theirs = attributor(x.clone(), onehot)
    ratio = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    print(f"\n[float64 vgg16 / {method}] max|ΔR| / max|R| = {ratio:.3g}")
    assert ratio <= 1e-9
