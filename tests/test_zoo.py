"""fxrel.zoo: the evaluation zoo's shipped weights, its test figures, exactness on it and the CAM layer it gets."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import fxrel
from fxrel.cam import cam_explainer, default_cam_layer
from fxrel.demo import make_scenes
from fxrel.demo.train import evaluate
from fxrel.zoo import SCENE_MODELS, ZOO_MODELS, scene_model, zoo_model
from fxrel.zoo.models import WEIGHTS_DIR, build_zoo_model, zoo_weights_path

#: the module whose output is each model's last spatial feature map (what a user would hand pytorch-grad-cam)
LAST_FEATURE_MODULE = {"zoo-vgg": "features.16", "zoo-resnet": "features.7", "zoo-bottleneck": "features.7",
                       "zoo-densenet": "features.21", "zoo-inception": "features.6", "zoo-timm": "layer4",
                       "zoo-vit": "blocks.3.norm1"}   # the ViT's: the tokens entering its last attention


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((WEIGHTS_DIR / "manifest.json").read_text())


def test_every_zoo_model_ships_with_its_hash_and_plain_recipe(manifest):
    assert tuple(manifest) == ZOO_MODELS
    for name, entry in manifest.items():
        path = zoo_weights_path(name)
        assert path.name == entry["file"] and hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["training"]["crop_fraction"] == 0 and entry["training"]["permute_channels"] == 0, name
        assert sum(p.numel() for p in build_zoo_model(name).parameters()) == entry["parameters"]
    assert sum(zoo_weights_path(n).stat().st_size for n in ZOO_MODELS) < 12e6


def test_the_manifest_test_figures_reproduce(manifest):
    """The F1 / exact-set accuracy / mAP in the manifest, recomputed from the shipped weights on the same scenes."""
    config = manifest[ZOO_MODELS[0]]["training"]
    test = make_scenes(config["test_scenes"], seed=config["test_seed"], split="test")
    for name in ZOO_MODELS:
        got = evaluate(zoo_model(name), test.images, test.labels.float())
        for key, value in manifest[name]["test"].items():
            assert got[key] == pytest.approx(value, abs=2e-3), (name, key)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_gradient_equals_autograd_and_lrp0_conserves_on_the_zoo(name):
    model = zoo_model(name).double()
    x = make_scenes(2, seed=3, split="test").images.double().requires_grad_(True)
    targets = torch.tensor([1, 7])
    logits = model(x)
    expected, = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    ours = fxrel.explain(model, x.detach(), targets, method="gradient")
    assert (ours - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert cam_explainer(model).canonical_graph(x.detach()) is not None


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_the_automatic_cam_layer_is_the_last_spatial_feature_map(name):
    model = zoo_model(name)
    x = make_scenes(1, seed=0, split="test").images
    node = next(n for n in cam_explainer(model).canonical_graph(x).graph.nodes if n.name == default_cam_layer(model, x))
    assert node.meta["fxrel_module"] == LAST_FEATURE_MODULE[name] or node.meta["fxrel_module"].startswith(
        LAST_FEATURE_MODULE[name] + "."), node.meta["fxrel_module"]
    automatic = fxrel.explain(model, x, 3, method="grad_cam")
    explicit = fxrel.explain(model, x, 3, method="grad_cam", layer=LAST_FEATURE_MODULE[name])
    assert automatic.shape == (1, 64, 64)
    torch.testing.assert_close(automatic, explicit)


def test_the_vgg_takes_only_its_input_size_and_scene_model_loads_both_sets():
    with pytest.raises(RuntimeError):
        build_zoo_model("zoo-vgg")(torch.rand(1, 3, 96, 96))
    assert set(SCENE_MODELS) >= set(ZOO_MODELS) and scene_model("demo-vgg").training is False
    with pytest.raises(ValueError, match="valid names"):
        scene_model("zoo-nope")


def test_ucag_runs_on_the_fixed_input_vgg_with_its_defaults():
    """Crops are explained at exactly the input size, the only size a flatten → linear head takes."""
    model = zoo_model("zoo-vgg")
    x = make_scenes(1, seed=0, split="test").images
    for base in ("grad_cam", "epsilon_plus_flat"):
        out = fxrel.explain(model, x, 3, method="ucag", base=base, n=3)
        assert out.shape == (1, 64, 64) and torch.isfinite(out).all(), base
