"""Slices, splits and chunks (CSP, Res2Net, GhostNet-style channel splits) as canonical shape ops: exact gradient,
conserving LRP-0 on a bias-free net, and clear errors for the slices that are not canonical."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrel
from tests.helpers import assert_exact_and_conserving, autograd_input_gradient, rel_error


class _SplitNet(nn.Module):
    """A CSP-style stage: split the channels, convolve one part, concatenate; plus a chunk and a spatial crop."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.part = nn.Conv2d(5, 5, 3, padding=1, bias=bias)
        self.head = nn.Linear(8, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        a, b = torch.split(h, [3, 5], dim=1)
        h = torch.cat([a, torch.relu(self.part(b))], 1)
        c, d = h.chunk(2, dim=1)
        h = torch.cat([d, c], 1)[:, :, 1:-1, 2:]
        return self.head(h.mean((2, 3)))


def test_gradient_through_splits_chunks_and_crops_equals_autograd():
    torch.manual_seed(0)
    net = _SplitNet().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12


@pytest.mark.parametrize("method", ["lrp_0", "rap", "srd", "agf"])
def test_relevance_methods_conserve_through_slices(method):
    torch.manual_seed(0)
    net = _SplitNet(bias=False).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = fxrel.Explainer(net, method)
    table = explainer.layer_table(x, 1)
    r = explainer(x, 1)
    assert torch.isfinite(r).all() and "slice" in table
    if method == "lrp_0":
        with torch.no_grad():
            assert torch.allclose(r.flatten(1).sum(1), net(x)[:, 1], rtol=1e-10)


class _Strided(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2].mean((2, 3))


class _BatchSlice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1].mean((2, 3))


class _BatchSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).softmax(0)


class _BatchMovedSlice(nn.Module):
    """The batch moved to axis 1 by a permute, then sliced there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(1, 0, 2, 3)[:, :1].mean((2, 3)).transpose(0, 1)


def test_strided_slices_have_the_exact_gradient():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    model = _Strided().eval()
    xg = x.clone().requires_grad_()
    (reference,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    assert torch.allclose(fxrel.Explainer(model, "gradient")(x, 1), reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("model", [_BatchSlice(), _BatchSoftmax(), _BatchMovedSlice()])
def test_ops_that_mix_samples_are_named(model):
    with pytest.raises(fxrel.UnsupportedOpError, match="mix the samples of a batch.*batch axis"):
        fxrel.Explainer(model.eval(), "gradient")(torch.randn(2, 3, 6, 6), 0)


class _Padded(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.conv, self.head = mode, nn.Conv2d(3, 4, 3, bias=False), nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.nn.functional.pad(x, (1, 1, 2, 0), mode=self.mode)))
        return self.head(torch.nn.functional.pad(h, (1, 1, 1, 1), mode=self.mode).mean((2, 3)))


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_reflect_and_replicate_padding_have_exact_gradients_and_conserve(mode):
    """Blur pools pad by reflection (timm's densenetblur, resnetblur): exact VJP, and LRP-0 keeps Σ R = y_t."""
    torch.manual_seed(0)
    net = _Padded(mode).eval().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    targets = torch.tensor([0, 1])
    assert_exact_and_conserving(net, x, targets)   # a bias-free net: the constant-free copy is the net


class _SamePooled(nn.Module):
    """NASNet/PNASNet: TF 'SAME' max-pooling as −∞ padding then pooling, and a crop as negative zero padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, bias=False), nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)   # signed: the −∞ padding must not win anywhere
        h = torch.nn.functional.max_pool2d(torch.nn.functional.pad(h, (0, 1, 0, 1), value=-float("inf")), 3, 2)
        h = torch.nn.functional.pad(torch.relu(h), (0, -1, -1, 0))
        return self.head(h.mean((2, 3)))


def test_minus_infinity_padding_before_max_pooling_and_cropping_are_canonical():
    torch.manual_seed(0)
    net = _SamePooled().eval().double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    targets = torch.tensor([1, 0])
    assert_exact_and_conserving(net, x, targets)   # a bias-free net: the constant-free copy is the net


class _InfPadded(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (1, 1, 1, 1), value=-float("inf")).mean((2, 3))


def test_minus_infinity_padding_elsewhere_is_named():
    with pytest.raises(fxrel.errors.UnsupportedOpError, match="−∞ padding before"):
        fxrel.Explainer(nn.Sequential(nn.Conv2d(3, 2, 1), _InfPadded()).eval(), "gradient").canonical_graph(
            torch.randn(1, 3, 4, 4))
