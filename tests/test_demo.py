"""fxrel.demo: the scene generator's ground truth and the shipped, trained demo models."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import fxrel
from fxrel.demo import CLASS_NAMES, DEMO_MODELS, SceneBatch, demo_model, make_scenes, split_indices
from fxrel.demo.models import WEIGHTS_DIR, build_model, weights_path
from fxrel.demo.scenes import MASK_THRESHOLD, digit_source


@pytest.fixture(scope="module")
def scenes() -> SceneBatch:
    return make_scenes(n=64, seed=0, split="test")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((WEIGHTS_DIR / "manifest.json").read_text())


def test_shapes_and_ranges(scenes: SceneBatch) -> None:
    assert CLASS_NAMES == tuple("0123456789")
    assert scenes.images.shape == (64, 3, 64, 64) and scenes.images.dtype == torch.float32
    assert scenes.labels.shape == (64, 10) and scenes.labels.dtype == torch.bool
    assert scenes.masks.shape == (64, 10, 64, 64) and scenes.masks.dtype == torch.bool
    assert scenes.boxes.shape == (64, 10, 4) and scenes.boxes.dtype == torch.int64
    assert 0.0 <= scenes.images.min() and scenes.images.max() <= 1.0
    counts = scenes.labels.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(counts.tolist())) == 3


def test_deterministic() -> None:
    a, b = make_scenes(8, seed=3, split="train"), make_scenes(8, seed=3, split="train")
    for field in dataclasses.fields(SceneBatch):
        assert torch.equal(getattr(a, field.name), getattr(b, field.name))
    assert not torch.equal(a.images, make_scenes(8, seed=4, split="train").images)
    assert not torch.equal(a.images, make_scenes(8, seed=3, split="test").images)


def test_ground_truth(scenes: SceneBatch) -> None:
    assert torch.equal(scenes.labels, scenes.masks.flatten(2).any(2))  # one multi-hot entry per distinct class
    assert torch.equal(scenes.labels, scenes.boxes[..., 0] >= 0)
    assert torch.equal(scenes.labels, scenes.sources >= 0)
    for i, c in scenes.labels.nonzero().tolist():
        x0, y0, x1, y1 = scenes.boxes[i, c].tolist()
        mask = scenes.masks[i, c]
        inside = torch.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert not (mask & ~inside).any()  # masks lie inside their boxes …
        box = mask[y0:y1, x0:x1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()  # … and the boxes are tight
        assert digit_source(int(scenes.sources[i, c]))[1] == c  # the source digit has the labelled class
    assert scenes.masks.sum(1).max() == 1  # digits of distinct classes, never overlapping
    sides = scenes.boxes[scenes.labels][:, 2:] - scenes.boxes[scenes.labels][:, :2]
    assert sides.max() <= 28 and sides[:, 1].min() >= 12  # 18–28 px digits; the heights span most of that


def test_mask_is_thresholded_digit(scenes: SceneBatch) -> None:
    """A digit's mask is its source image upscaled to some 18–28 px and thresholded, placed at the box."""
    import torch.nn.functional as F

    i, c = scenes.labels.nonzero()[0].tolist()
    digit = torch.from_numpy(digit_source(int(scenes.sources[i, c]))[0])[None, None]
    mask = scenes.masks[i, c]
    matches = []
    for side in range(18, 29):
        up = F.interpolate(digit, size=(side, side), mode="bilinear", align_corners=False)[0, 0] > MASK_THRESHOLD
        rows, cols = up.any(1).nonzero(), up.any(0).nonzero()
        tight = up[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        x0, y0, x1, y1 = scenes.boxes[i, c].tolist()
        matches.append(tight.shape == (y1 - y0, x1 - x0) and torch.equal(tight, mask[y0:y1, x0:x1]))
    assert any(matches)


def test_split_disjoint() -> None:
    train, test = split_indices("train"), split_indices("test")
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    assert 0.74 < len(train) / 1797 < 0.76
    for split, pool in (("train", train), ("test", test)):
        used = make_scenes(200, seed=1, split=split).sources
        assert np.isin(used[used >= 0].numpy(), pool).all()
    with pytest.raises(ValueError, match="split"):
        make_scenes(2, split="val")


def test_batch_indexing(scenes: SceneBatch) -> None:
    part = scenes[4:10]
    assert isinstance(part, SceneBatch) and len(part) == 6 and torch.equal(part.masks, scenes.masks[4:10])
    assert len(scenes[3]) == 1 and torch.equal(scenes[-1].images, scenes.images[-1:])
    assert scenes.to("cpu").images.device.type == "cpu"


def test_other_sizes() -> None:
    big = make_scenes(4, seed=0, size=96)
    assert big.images.shape == (4, 3, 96, 96) and torch.equal(big.labels, big.masks.flatten(2).any(2))


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="demo-vgg"):
        demo_model("demo-alexnet")


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_model_trained(name: str, scenes: SceneBatch, manifest: dict) -> None:
    model = demo_model(name)
    assert not any(m.training for m in model.modules())
    path = weights_path(name)
    assert manifest[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest[name]["parameters"] == sum(p.numel() for p in model.parameters()) <= 600_000
    assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
    with torch.no_grad():
        logits = model(scenes.images)
        assert model(torch.rand(2, 3, 92, 92)).shape == (2, 10)
    f1 = f1_score(scenes.labels.numpy(), (logits > 0).numpy(), average="macro", zero_division=0)
    assert f1 >= 0.85, f"{name}: mean per-class F1 {f1:.3f} on 64 test scenes"


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_gradient_matches_autograd(name: str, scenes: SceneBatch) -> None:
    """The toolkit captures every demo architecture: its gradient equals autograd's (float64)."""
    model = copy.deepcopy(demo_model(name)).double()
    x = scenes.images[:2].double()
    target = int(scenes.labels[0].nonzero()[0])
    ours = fxrel.explain(model, x, target=target, method="gradient")
    leaf = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-8)
    assert reference.abs().max() > 1e-6


def test_untrained_architectures_feature_maps() -> None:
    """Every architecture ends in an 8×8 feature map at 64 px (for Grad-CAM) and stays within the size budget."""
    for name in DEMO_MODELS:
        model = build_model(name).eval()
        assert model.features(torch.rand(1, 3, 64, 64)).shape[-2:] == (8, 8)
        assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 600_000
