"""The CAM family from the engine's gradient stream vs captum's LayerGradCam and autograd references."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from torch import nn

import fxrel
from fxrel import cam as fcam
from tests.helpers import rel_error

torch.set_num_threads(2)

RTOL = 1e-5


class SmallVGG(nn.Module):
    """VGG-shaped: ``features`` (conv/ReLU/max-pool) → ``avgpool`` → flatten → ``classifier``."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    return model, torch.randn(2, 3, 64, 64), torch.tensor([3, 517])


@pytest.fixture(scope="module")
def vgg() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = SmallVGG().eval()
    return model, torch.randn(2, 3, 32, 32), torch.tensor([1, 5])


def autograd_activation_and_gradient(model: nn.Module, layer: nn.Module, x: torch.Tensor,
                                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output A and ∂y_t/∂A with torch.autograd (a forward hook keeps A, retain_grad keeps G)."""
    saved: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        saved["a"] = output

    handle = layer.register_forward_hook(hook)
    try:
        out = model(x.clone().requires_grad_(True))
        out[torch.arange(len(x)), targets].sum().backward()
    finally:
        handle.remove()
    return saved["a"].detach(), saved["a"].grad.detach()


# paper formulas, written out independently of fxrel.cam
def ref_layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Jiang et al. 2021 Eq. 5–6: ReLU(Σ_c ReLU(g_c) · A_c)."""
    return torch.relu((torch.relu(g) * a).sum(1))


def ref_gradcam_pp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Chattopadhay et al. 2018 Eq. 19 (α) and Eq. 7 (w = Σ α ReLU(g)), pytorch-grad-cam's eps guard."""
    n, c = a.shape[:2]
    weights = torch.zeros(n, c, dtype=a.dtype)
    for i in range(n):
        for k in range(c):
            gk, s = g[i, k], a[i, k].sum()
            alpha = gk ** 2 / (2 * gk ** 2 + s * gk ** 3 + 1e-6)
            alpha[gk == 0] = 0
            weights[i, k] = (alpha * torch.relu(gk)).sum()
    return torch.relu((weights[:, :, None, None] * a).sum(1))


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = RTOL) -> None:
    assert actual.shape == expected.shape
    assert expected.abs().max() > 0, "degenerate reference map"
    err = rel_error(actual, expected)
    assert err < tol, f"relative error {err:.2e}"


# -- agreement ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_gradcam_equals_captum_on_resnet18(resnet, layer):
    model, x, targets = resnet
    expected = LayerGradCam(model, getattr(model, layer)).attribute(x, targets, relu_attributions=True)
    ours = fcam.cam(model, x, targets, layer, upsample=None)
    assert_rel(ours, expected.squeeze(1).detach())


def test_gradcam_equals_captum_on_a_vgg_like_net(vgg):
    model, x, targets = vgg
    for index in (4, 6):
        expected = LayerGradCam(model, model.features[index]).attribute(x, targets, relu_attributions=True)
        assert_rel(fcam.cam(model, x, targets, f"features.{index}", upsample=None), expected.squeeze(1).detach())


@pytest.mark.parametrize("kind, reference", [("layercam", ref_layercam), ("gradcam++", ref_gradcam_pp)])
def test_layercam_and_gradcam_pp_equal_autograd_references(resnet, vgg, kind, reference):
    for model, x, targets, name in [(*resnet, "layer4"), (*resnet, "layer3"), (*vgg, "features.6")]:
        module = model.get_submodule(name)
        a, g = autograd_activation_and_gradient(model, module, x, targets)
        assert_rel(fcam.cam(model, x, targets, name, kind=kind, upsample=None), reference(a, g))


def test_maps_reuse_the_engine_activation_and_gradient(resnet):
    model, x, targets = resnet
    a, g = autograd_activation_and_gradient(model, model.layer4, x, targets)
    ex = fxrel.Explainer(model, "gradient", stops=["layer4"]).attribute(x, targets)
    assert_rel(ex.values["layer4"], a)
    assert_rel(ex.relevance["layer4"], g)
    signed = fcam.gradcam_map(a, g, relu=False)
    assert (signed < 0).any()
    torch.testing.assert_close(fcam.gradcam_map(a, g), signed.clamp(min=0))


# -- API ------------------------------------------------------------------------------------------------------------
def test_maps_come_at_the_input_size_by_default_and_at_the_layer_with_upsample_none(resnet):
    model, x, targets = resnet
    small = fcam.cam(model, x, targets, "layer4", upsample=None)
    assert small.shape == (2, 2, 2)
    up = fcam.cam(model, x, targets, "layer4")
    assert up.shape == (2, 64, 64)
    torch.testing.assert_close(fxrel.explain(model, x, targets, method="grad_cam", layer="layer4"), up)
    expected = torch.nn.functional.interpolate(small[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, expected[:, 0])
    assert fcam.cam(model, x, targets, "layer4", upsample=(10, 12), mode="nearest").shape == (2, 10, 12)


def test_default_layer_is_the_last_spatial_feature_map(resnet, vgg):
    for (model, x, _), module in [(resnet, "layer4"), (vgg, "features.6")]:
        name = fcam.default_cam_layer(model, x)
        node = next(n for n in fcam.cam_explainer(model).canonical_graph(x).graph.nodes if n.name == name)
        assert node.meta["fxrel_module"].startswith(module)
        assert node.meta["fxrel_kind"] == "activation"
    model, x, targets = resnet
    torch.testing.assert_close(fcam.cam(model, x, targets), fcam.cam(model, x, targets, "layer4"))


def test_explainer_is_cached_per_model_and_accepted_directly(resnet, vgg):
    model, x, targets = vgg
    explainer = fcam.cam_explainer(model)
    assert fcam.cam_explainer(model) is explainer
    fcam.cam(model, x, targets, "features.6")
    graphs = len(explainer._graphs)
    fcam.cam(model, x, targets, "features.6", kind="layercam")
    assert len(explainer._graphs) == graphs  # same compiled relevance program reused
    own = fxrel.Explainer(model, "gradient")
    torch.testing.assert_close(fcam.cam(own, x, targets, "features.6"), fcam.cam(model, x, targets, "features.6"))
    top1 = fcam.cam(model, x, "top1", "features.6")
    predicted = model(x).argmax(1)
    torch.testing.assert_close(top1, fcam.cam(model, x, predicted, "features.6"))


def test_cache_does_not_keep_models_alive():
    model = SmallVGG().eval()
    fcam.cam(model, torch.randn(1, 3, 16, 16), 0, "features.6")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# -- errors ---------------------------------------------------------------------------------------------------------
def test_unknown_layer_lists_candidates(vgg):
    model, x, targets = vgg
    with pytest.raises(fxrel.RuleError, match=r"no node or module named 'features\.99'.*features\.6"):
        fcam.cam(model, x, targets, "features.99")


def test_bad_kind_and_bad_arguments(vgg):
    model, x, targets = vgg
    with pytest.raises(fxrel.InputError, match="unknown CAM kind 'scorecam'.*gradcam"):
        fcam.cam(model, x, targets, "features.6", kind="scorecam")
    with pytest.raises(fxrel.InputError, match="4-D feature map"):
        fcam.cam(model, x, targets, "classifier.0")
    with pytest.raises(fxrel.InputError, match="upsample"):
        fcam.cam(model, x, targets, "features.6", upsample="output")
    with pytest.raises(fxrel.InputError, match="method .lrp_epsilon."):
        fcam.cam(fxrel.Explainer(model, "lrp_epsilon"), x, targets, "features.6")


def test_cam_with_a_compiled_gradient_explainer(vgg):
    """A compiled gradient explainer serves the CAMs too (one graph, no hooks) and agrees with the eager one."""
    model, x, targets = vgg
    compiled = fxrel.Explainer(model, "gradient", compile=True)
    for kind in fcam.CAM_KINDS:
        assert_rel(fcam.cam(compiled, x, targets, kind=kind), fcam.cam(model, x, targets, kind=kind))


def test_cams_are_sweeps_eager_and_compiled(vgg):
    """Each CAM is a registered sweep: its map is the relevance graph's output at the layer (the formula recorded
    into the graph), equal to the post-hoc driver's, and the same under torch.compile."""
    model, x, targets = vgg
    for name, kind in (("grad_cam", "gradcam"), ("grad_cam_pp", "gradcam++"), ("layer_cam", "layercam")):
        eager = fxrel.Explainer(model, name, layer="features.6")
        torch.testing.assert_close(eager(x, targets), fcam.cam(model, x, targets, "features.6", kind=kind))
        compiled = fxrel.Explainer(model, name, layer="features.6", compile=True)
        assert_rel(compiled(x, targets), eager(x, targets))
    assert fxrel.Explainer(model, "grad_cam", upsample=None)(x, targets).shape[-2:] != x.shape[-2:]
