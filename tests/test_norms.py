"""Normalisations, constants and the other ops of timm's ConvNeXt/NFNet/SKNet/HRNet families as canonical ops.

* LayerNorm (channels-last, as ConvNeXt), GroupNorm, hand-written RMSNorm ``x·rsqrt(mean(x²) + ε)`` and SimpleNorm
  ``x·rsqrt(var(x) + ε)`` become ``affine(gate(center(x), inv_std(·)))``: the gradient is exact, and LRP-0 is the
  LN-rule — gradient × input of the same net with every 1/σ detached (Ali et al. 2022) — which conserves;
* parameter-only computations are folded (NFNet's weight standardisation), products and sums with constants are
  affines (folded into the conv before them where per-channel);
* nearest upsampling, softmax gates, ``stack`` and branch sums keep the gradient exact and LRP-0 conserving;
* what stays outside the op set is named in the error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrel
from fxrel.coverage import constant_free
from fxrel.errors import UnsupportedOpError
from fxrel.graphs import ops
from tests.helpers import assert_exact_and_conserving, autograd_input_gradient, rel_error


class _Norm(nn.Module):
    """One of the normalisations over channels of an NCHW map; ``detach`` detaches 1/σ (the LN-rule's reference)."""

    def __init__(self, kind: str, channels: int, affine: bool) -> None:
        super().__init__()
        self.kind, self.detach = kind, False
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(channels)) if affine else None
        self.bias = nn.Parameter(0.1 * torch.randn(channels)) if affine else None

    def _scaled(self, x: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(m + eps)
        return x * (r.detach() if self.detach else r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach or self.kind in ("rms", "simple"):
            x, m = self._reference(x)
            y = self._scaled(x, m, 1e-5)
        elif self.kind == "layer":
            y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)
        else:
            y = F.group_norm(x, 2, eps=1e-5)
        return y if self.weight is None else y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def _reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised tensor before scaling, its mean square / variance), spelled out."""
        if self.kind == "rms":
            return x, x.pow(2).mean(1, keepdim=True)
        if self.kind == "simple":
            return x, x.var(1, keepdim=True)
        if self.kind == "layer":
            centered = x - x.mean(1, keepdim=True)
            return centered, centered.pow(2).mean(1, keepdim=True)
        grouped = x.reshape(x.shape[0], 2, -1)
        centered = grouped - grouped.mean(2, keepdim=True)
        m = centered.pow(2).mean(2, keepdim=True)
        return centered.reshape(x.shape), m.expand(-1, -1, centered.shape[2]).reshape(x.shape)


def norm_net(kind: str, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), _Norm(kind, 8, affine=True), nn.ReLU(),
                         nn.Conv2d(8, 8, 1, bias=bias), _Norm(kind, 8, affine=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5, bias=bias)).eval().double()


def _x(n: int = 2, size: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


KINDS = ["layer", "group", "rms", "simple"]


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_through_every_normalisation_equals_autograd(kind):
    net, x, targets = norm_net(kind), _x(), torch.tensor([1, 4])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_lrp0_is_the_ln_rule_gradient_x_input_with_sigma_detached_and_conserves(kind):
    net, x, targets = norm_net(kind, bias=False), _x(), torch.tensor([1, 4])
    for norm in (net[1], net[4]):
        if norm.bias is not None:
            nn.init.zeros_(norm.bias)
    relevance = fxrel.Explainer(net, "lrp_0")(x, targets)
    for norm in (net[1], net[4]):
        norm.detach = True
    reference = x * autograd_input_gradient(net, x, targets)
    assert rel_error(relevance, reference) < 1e-10
    with torch.no_grad():
        logits = net(x).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(relevance.sum((1, 2, 3)), logits, rtol=1e-10, atol=1e-12)


def test_a_layer_norm_is_centering_a_statistic_gate_and_an_affine():
    graph = fxrel.Explainer(norm_net("layer"), "lrp_0").canonical_graph(_x())
    kinds = [n.meta.get("fxrel_kind") for n in graph.graph.nodes]
    assert kinds.count("center") == 2 and kinds.count("stat") == 2 and kinds.count("gate") == 2
    assert "affine" in kinds   # the first norm's γ, β (it follows the gate, not a conv: not folded)


class _StdConv(nn.Conv2d):
    """NFNet's ScaledStdConv2d: the weight standardised in the forward pass, from parameters only."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))

    def standardized(self) -> torch.Tensor:
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                            eps=1e-6).reshape_as(self.weight) * self.gain * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized(), self.bias, self.stride, self.padding)


class _Scaled(nn.Module):
    """Products and sums with constants: NFNet's β and α gains, a layer scale, ``x + 0`` (MobileOne)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(6, 6, 3, padding=1), nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 0 + self.conv(x * 0.5)
        h = h.mul(self.gamma.reshape(1, -1, 1, 1)) / 2.0
        return torch.relu(h - 0.0) * 1.7 + x


def test_parameter_computations_fold_and_constant_products_become_affines():
    torch.manual_seed(0)
    net = nn.Sequential(_StdConv(3, 6, 3, padding=1), nn.ReLU(), _Scaled(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 4)).eval().double()
    x, targets = _x(), torch.tensor([0, 3])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12
    graph = fxrel.Explainer(net, "gradient").canonical_graph(x)
    convs = [n for n in graph.graph.nodes if n.meta.get("fxrel_kind") == "conv"]
    assert torch.allclose(getattr(graph, convs[0].args[1].target), net[0].standardized(), atol=1e-14)
    affines = [n for n in graph.graph.nodes if n.meta.get("fxrel_kind") == "affine"]
    # x·0.5 (before the conv) and the ·1.7 after the ReLU stay; γ and /2 fold into the conv, +0 and −0 vanish
    assert len(affines) == 2
    bare = constant_free(net)
    with torch.no_grad():
        logits = bare(x).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(fxrel.Explainer(bare, "lrp_0")(x, targets).sum((1, 2, 3)), logits, rtol=1e-10)


class _Upsampled(nn.Module):
    """HRNet's fuse layer and GhostNetV2's gate: nearest upsampling by a factor and to a size, a same-shaped
    sigmoid gate; MobileNetV5's bilinear upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.low, self.gate = nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Conv2d(6, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        gate = F.interpolate(torch.sigmoid(self.gate(F.avg_pool2d(x, 2))), size=x.shape[-2:], mode="nearest")
        return (x * gate + F.interpolate(low, scale_factor=2.0, mode="nearest")
                + F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False))


class _Selective(nn.Module):
    """SKNet's selective kernel: stacked branches, softmax attention over the branch axis, the weighted sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.attn = nn.Conv2d(6, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.stack([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        attn = self.attn(branches.sum(1).mean((2, 3), keepdim=True)).view(x.shape[0], 2, 6, 1, 1).softmax(1)
        return (branches * attn).sum(1)


class _GlobalContext(nn.Module):
    """GCNet's attention pooling: softmax weights over positions, ``values @ weights``, added back broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.transform = nn.Conv2d(6, 1, 1), nn.Conv2d(6, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = self.attn(x).view(n, 1, h * w).softmax(-1).unsqueeze(3)
        context = (x.view(n, c, h * w).unsqueeze(1) @ weights).view(n, c, 1, 1)
        return x + self.transform(context)


class _ResponseNormalized(nn.Module):
    """ConvNeXt-V2's GlobalResponseNorm (timm's, NCHW) with non-zero γ, β, so that its statistic matters."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers.grn import GlobalResponseNorm

        self.grn = GlobalResponseNorm(6, channels_last=False)
        nn.init.normal_(self.grn.weight)
        nn.init.normal_(self.grn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grn(x)


class _Evo(nn.Module):
    """timm's EvoNorm2dS0 / S0a: ``x·σ(v·x) / group_std(x)·γ + β``, the group std computed in float32."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        from timm.layers import evo_norm

        self.norm = getattr(evo_norm, f"EvoNorm2d{variant}")(6, groups=2)
        for p in (self.norm.v, self.norm.weight, self.norm.bias):
            nn.init.normal_(p, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_evonorm_group_std_is_a_gate_of_the_grouped_value():
    """The float32 statistic is kept in the input's dtype by the canonical graph: agreement to float32 precision."""
    for variant in ("S0", "S0a"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _Evo(variant), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(6, 4)).eval().double()
        x, targets = _x(size=8), torch.tensor([2, 1])
        assert_exact_and_conserving(net, x, targets, gradient_tol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [_Upsampled, _Selective, _GlobalContext, _ResponseNormalized])
def test_resampling_and_attention_gates_keep_the_gradient_exact_and_lrp0_conserving(block):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), block(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 4)).eval().double()
    x, targets = _x(size=8), torch.tensor([2, 1])
    assert_exact_and_conserving(net, x, targets, atol=1e-12)


class _Divided(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x.mean((2, 3), keepdim=True) + 1)


class _Reciprocal(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 / (x.mean((2, 3), keepdim=True) + 1))


class _Cubed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(3).mean(1, keepdim=True) + 1)


@pytest.mark.parametrize("block, what", [(_Reciprocal, "reciprocal"), (_Cubed, "power 3")])
def test_ops_outside_the_set_are_named(block, what):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedOpError, match=what):
        fxrel.Explainer(net, "gradient").canonical_graph(torch.randn(1, 3, 8, 8))


def test_a_division_by_a_computed_tensor_is_a_gate_by_its_inverse():
    """``x / (mean(x) + 1)``: ``channel_gate(x, inverse(·))``; the gradient is autograd's, and LRP-0 (the divisor a
    constant for the rules, as LayerNorm's σ is) conserves."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Divided(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    graph = fxrel.Explainer(net, "gradient").canonical_graph(x)
    assert [n.target for n in graph.graph.nodes if n.meta.get("fxrel_kind") == ops.STAT] == [ops.inverse]
    assert_exact_and_conserving(net, x, torch.tensor([1, 0]))


class _Attention(nn.Module):
    """Self-attention over positions (CPUBone's hybrid stage): 1×1-conv q, k, v, two heads,
    ``scaled_dot_product_attention``; ``detach`` detaches the attention weights (the AH-rule's reference)."""

    def __init__(self, channels: int = 6, bias: bool = True) -> None:
        super().__init__()
        self.qkv, self.detach = nn.Conv2d(channels, 3 * channels, 1, bias=bias), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, 2, c // 2, h * w).transpose(-1, -2).unbind(1)
        if self.detach:
            weights = torch.softmax(q @ k.transpose(-1, -2) / (c // 2) ** 0.5, -1).detach()
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return x + out.transpose(-1, -2).reshape(n, c, h, w)


def attention_net(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), _Attention(bias=bias), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4, bias=bias)).eval().double()


def test_attention_gradient_is_exact_and_lrp0_is_the_ah_rule():
    """Exact gradient through q, k and v; LRP-0 with ``attention="cp"`` = gradient × input of the same bias-free net
    with the attention weights detached (Ali et al. 2022's AH-rule), which conserves."""
    net, x, targets = attention_net(), _x(size=6), torch.tensor([2, 1])
    assert rel_error(fxrel.Explainer(net, "gradient")(x, targets), autograd_input_gradient(net, x, targets)) < 1e-12
    bare = attention_net(bias=False)
    relevance = fxrel.Explainer(bare, "lrp_0", attention="cp")(x, targets)
    with torch.no_grad():
        logits = bare(x).gather(1, targets[:, None]).squeeze(1)
    bare[2].detach = True
    assert rel_error(relevance, x * autograd_input_gradient(bare, x, targets)) < 1e-10
    assert torch.allclose(relevance.sum((1, 2, 3)), logits, rtol=1e-10)


class _MultiQuery(nn.Module):
    """MobileNetV4's multi-query attention: two query heads share one key/value head (broadcast)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.q(x).reshape(n, 2, 3, h * w).transpose(-1, -2)
        k, v = self.kv(x).reshape(n, 1, 2, 3, h * w).transpose(-1, -2).unbind(2)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(n, c, h, w)


def test_multi_query_attention_sums_over_the_shared_head():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), _MultiQuery(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 4)).eval().double()
    x, targets = _x(size=6), torch.tensor([2, 1])
    assert_exact_and_conserving(net, x, targets)
    for method in ("lrp_0", "srd"):
        relevance = fxrel.Explainer(constant_free(net), method)(x, targets)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_masked_attention_is_exact_and_dropout_is_named():
    """Causal masking and a boolean mask become a −∞ attention bias: the gradient stays autograd's."""
    class Masked(_Attention):
        def __init__(self, dropout: float = 0.0) -> None:
            super().__init__()
            self.dropout = dropout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.flatten(2).transpose(-1, -2)
            keep = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=self.dropout) + \
                F.scaled_dot_product_attention(q, 2 * q, q, attn_mask=keep.flip(0))
            return out.transpose(-1, -2).reshape(x.shape)

    net = nn.Sequential(nn.Conv2d(3, 6, 1), Masked(), nn.Flatten(), nn.Linear(96, 3)).eval().double()
    x = _x(size=4)
    xg = x.clone().requires_grad_()
    (reference,) = torch.autograd.grad(net(xg)[:, 1].sum(), xg)
    assert torch.allclose(fxrel.Explainer(net, "gradient")(x, 1), reference, rtol=1e-10, atol=1e-14)
    net[1].dropout = 0.5
    with pytest.raises(UnsupportedOpError, match="dropout"):
        fxrel.Explainer(net, "gradient").canonical_graph(x)


class _ChannelsLastNorm(nn.Module):
    """ConvNeXt's LayerNorm: permute to channels-last, ``nn.LayerNorm`` (γ, β shaped ``[C]``), permute back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        nn.init.normal_(self.norm.bias, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def zoo_blocks_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _ChannelsLastNorm(6), nn.GELU(), _GlobalContext(),
                         _Selective(), nn.GroupNorm(2, 6), _ResponseNormalized(), _Upsampled(), _Attention(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval().double()


@pytest.mark.parametrize("method", sorted(set(fxrel.methods()) - {"agf_ssl"}))   # agf_ssl needs reference images
def test_every_method_runs_through_the_new_blocks(method):
    """All rule sets (and the CAMs and wrappers over them) handle the center/stat/attend kinds and channels-last
    affines: finite relevance, shaped like the input or a map of it."""
    net, x = zoo_blocks_net(), _x(size=8)
    relevance = fxrel.explain(net, x, torch.tensor([0, 3]), method=method)
    assert relevance.shape[0] == 2 and relevance.shape[-2:] == x.shape[-2:] and torch.isfinite(relevance).all()


def test_the_new_blocks_compile_without_graph_breaks():
    net, x = zoo_blocks_net(), _x(size=8)
    eager = fxrel.Explainer(net, "lrp_epsilon")
    graph = eager.relevance_graph(x)
    mask = torch.zeros(2, 4, dtype=x.dtype)
    mask[:, 1] = 1
    explanation = torch._dynamo.explain(graph.module)(x, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert rel_error(fxrel.Explainer(net, "lrp_epsilon", compile=True)(x, 1), eager(x, 1)) < 1e-12
