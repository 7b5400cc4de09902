"""The issue's model list: capture, canonicalise and explain torchvision and timm CNNs (random weights).

For each model: the canonical graph reproduces the eager output, BatchNorm after a conv is folded (only
non-foldable ones stay affine), the gradient rule set equals autograd, and LRP-0 equals gradient × input.
These are exactness claims, so they are checked in float64 (in float32, folding 50 calibrated BatchNorms changes the
rounding by ~1e-5 of the logits). Inputs are small to keep CI fast; full-size float32 runs are marked slow, and so are
the timm copies of the four families and torchvision's Inception-v3 (GoogLeNet runs the Inception branches by
default; timm's models are sampled by tests/test_coverage.py).
"""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import fxrel
from fxrel.graphs import canonicalize, capture
from fxrel.random_weights import calibrate_batchnorm
from tests.helpers import autograd_input_gradient, rel_error

MODELS = [
    ("torchvision", "vgg16", 32), ("torchvision", "resnet50", 32), ("torchvision", "densenet121", 32),
    ("torchvision", "googlenet", 32), ("torchvision", "inception_v3", 75),
    ("timm", "vgg16", 32), ("timm", "resnet50", 32), ("timm", "densenet121", 32),
    ("timm", "inception_v3", 75), ("timm", "inception_v4", 75),
]
#: run by default; the others take 25–97 s each on 2 cores and are marked slow (DenseNet-121, 77 s: its
#: concatenations are checked by default on timm's densenetblur121d in test_coverage, its canonical graph below)
DEFAULT_RUN = {("torchvision", "vgg16"), ("torchvision", "resnet50"), ("torchvision", "googlenet")}


def build(source: str, name: str, size: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "torchvision":
        extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, name)(weights=None, num_classes=10, **extra)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10)
    return calibrate_batchnorm(model, size, seed=1, perturb=0.1)  # non-trivial BatchNorm: folding is really tested


@pytest.mark.parametrize("source,name,size", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}", marks=() if case[:2] in DEFAULT_RUN else pytest.mark.slow)
    for case in MODELS])
def test_capture_canonicalize_and_explain(source, name, size):
    model = build(source, name, size).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    canonical = canonicalize(capture(model, x), (x,))
    with torch.no_grad():
        assert rel_error(canonical(x), model(x)) < 1e-10
    kinds = [n.meta.get("fxrel_kind") for n in canonical.graph.nodes]
    assert "conv" in kinds and "linear" in kinds
    for node in canonical.graph.nodes:  # an affine node survives only where no conv/linear feeds it alone
        if node.meta.get("fxrel_kind") == "affine":
            prev = node.args[0]
            assert not (prev.meta.get("fxrel_kind") in ("conv", "linear") and len(prev.users) == 1)
        if node.op == "call_function":
            assert "tensor_meta" in node.meta and node.meta["fxrel_source"]
    targets = torch.tensor([1, 7])
    gradient = fxrel.Explainer(model, "gradient")(x, targets)
    reference = autograd_input_gradient(model, x, targets)
    assert rel_error(gradient, reference) < 1e-10
    lrp0 = fxrel.Explainer(model, "lrp_0")(x, targets)
    assert rel_error(lrp0, reference * x) < 1e-8
    # the contrastive methods run on every family; their (scaled) target − dual differences sum to zero
    for method, params in (("clrp", {"combine": "agf"}), ("clrp", {"variant": 2, "combine": "agf"}), ("sglrp", {}),
                           ("contrastive_excitation_backprop", {})):
        r = fxrel.Explainer(model, method, **params)(x, targets).flatten(1)
        scale = model(x).detach().abs().max()  # the maps being subtracted carry about the logits' mass
        assert torch.isfinite(r).all() and (r.sum(1).abs() <= 1e-9 * scale).all(), method
    # the CAM family finds the last feature map by itself; the wrappers run over a rule set
    cam = fxrel.explain(model, x, targets, method="grad_cam", upsample="input")
    assert cam.shape == (2, size, size) and torch.isfinite(cam).all() and cam.min() >= 0
    for wrapper, params in (("integrated_gradients", {"steps": 2}), ("smoothgrad", {"samples": 2})):
        r = fxrel.explain(model, x, targets, method=wrapper, base="epsilon_plus_flat", **params)
        assert r.shape == x.shape and torch.isfinite(r).all(), wrapper


def test_densenet_keeps_preactivation_batchnorm_as_affine():
    model = build("torchvision", "densenet121")
    x = torch.randn(1, 3, 32, 32)
    canonical = canonicalize(capture(model, x), (x,))
    affine = [n for n in canonical.graph.nodes if n.meta.get("fxrel_kind") == "affine"]
    folded = [n for n in canonical.graph.nodes if n.meta.get("fxrel_folded")]
    # norm1 of every dense layer follows a concatenation (58 layers + 3 transitions + norm5) and stays affine;
    # norm2 (after conv1 in each of the 58 layers) and the stem's norm0 (after conv0) are folded
    assert len(affine) == 62 and len(folded) == 59
    assert all(n.args[0].meta["fxrel_kind"] in ("cat", "maxpool", "avgpool") for n in affine)
