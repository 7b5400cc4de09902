"""APOP (SRD paper, Appendix D, Alg. 1) as a rewrite of the captured graph: the pattern input as its own probe
reproduces the model, a literal hook-based implementation agrees, and a trained demo model predicts far above chance
from an empty image."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrel
from fxrel.apop import apop_predict


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval().double()


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def literal_apop(net: nn.Sequential, x: torch.Tensor, probe: torch.Tensor, relu: bool) -> torch.Tensor:
    """Alg. 1: run x and record each ReLU's sign mask and each max-pool's indices, then run the probe with them."""
    masks, indices = [], []
    h = x
    for m in net:
        if isinstance(m, nn.MaxPool2d):
            h, idx = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, return_indices=True)
            indices.append(idx)
        else:
            h = m(h)
            if isinstance(m, nn.ReLU):
                masks.append(torch.sign(h))
    h = probe
    for m in net:
        if isinstance(m, nn.ReLU):
            h = h * masks.pop(0)
            h = torch.relu(h) if relu else h
        elif isinstance(m, nn.MaxPool2d):
            idx = indices.pop(0)
            h = h.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        else:
            h = m(h)
    return h


@pytest.mark.parametrize("relu", [False, True])
def test_the_pattern_input_as_its_own_probe_reproduces_the_model(relu):
    net, x = small_net(), _x()
    with torch.no_grad():
        assert torch.allclose(apop_predict(net, x, x, relu=relu), net(x), atol=1e-12)


@pytest.mark.parametrize("probe", ["zeros", "ones", "normal"])
@pytest.mark.parametrize("relu", [False, True])
def test_graph_rewrite_equals_the_literal_algorithm(probe, relu):
    net, x = small_net(), _x()
    got = apop_predict(net, x, probe, relu=relu, seed=4)
    from fxrel.apop import probe_like
    with torch.no_grad():
        expected = literal_apop(net, x, probe_like(x, probe, 4), relu)
    assert torch.allclose(got, expected, atol=1e-12)


def test_a_trained_model_predicts_far_above_chance_from_an_empty_image():
    """Measured (examples/apop_demo.py, 64 scenes): demo-vgg top-1 hit rate 0.94 from zeros (APOP), 1.00 with the
    ReLU after the mask, against 0.19 by chance."""
    from fxrel.demo import demo_model, make_scenes

    scenes = make_scenes(32, seed=7, split="test")
    model = demo_model("demo-vgg")
    chance = scenes.labels.float().sum(1).mean().item() / scenes.labels.shape[1]
    for relu in (False, True):
        top = apop_predict(model, scenes.images, "zeros", relu=relu).argmax(1)
        hits = scenes.labels[torch.arange(32), top].float().mean().item()
        assert hits > 3 * chance, (relu, hits, chance)


def test_bad_input_is_named():
    net, x = small_net(), _x(1)
    with pytest.raises(fxrel.InputError, match="probe"):
        apop_predict(net, x, "noise")
    with pytest.raises(fxrel.InputError, match="shape"):
        apop_predict(net, x, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(fxrel.UnsupportedOpError, match="ReLU"):
        apop_predict(gelu, torch.zeros(1, 3, 6, 6))


def test_repeated_predictions_reuse_one_capture(monkeypatch):
    net, x = small_net(), _x()
    first = apop_predict(net, x, "zeros")
    import fxrel.explainer as module_under_test
    monkeypatch.setattr(module_under_test, "capture", lambda *a, **k: pytest.fail("captured again"))
    assert torch.equal(apop_predict(net, x, "zeros"), first)
