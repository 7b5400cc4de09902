"""Every canonical op's hand-written VJP (:mod:`fxrel.graphs.ops`) against ``torch.autograd``, op by op.

A table of small models exercises each canonical target (convolutions of every stride/padding/dilation/groups,
pooling with ``ceil_mode``/``count_include_pad``/adaptive sizes, every shape op, pad modes, gates, the
normalisation statistics, attention …). Each is captured and canonicalised as :class:`fxrel.Explainer` does; then
for every canonical call node, its VJP — called as the relevance-graph builder calls it,
``ops.spec_of(node).vjp(node, grad, inputs, weight)`` — on a random cotangent must equal ``torch.autograd.grad`` of
the node's own target re-run on the same inputs, in float64. Convolutions also check their per-sample forms.

The tests are parametrised by the canonical target (``ops.OP_SPECS``), so a new op fails until a case below
exercises it; targets no captured model produces are built as one-node graphs (``_DIRECT``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxrel.graphs import ops
from fxrel.graphs.canonical import canonicalize
from fxrel.graphs.capture import capture
from tests.helpers import rel_error

aten = torch.ops.aten
TOL = 1e-10
D = torch.float64


def _x(*shape: int, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


# --- the models ------------------------------------------------------------------------------------------------
class _Convs(nn.Module):
    """2-D convolutions: stride, padding, dilation, groups, depthwise, rectangular kernels, strides that leave a
    remainder (the transposed convolution's output padding), with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.d = nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0))
        self.e = nn.Conv2d(3, 2, 2, stride=2)   # 9×9 → 4×4: the last row and column of the input unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.d(self.c(self.b(self.a(x))))
        return torch.cat([h.mean((2, 3)), self.e(x).mean((2, 3))], 1)


class _Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.Conv1d(4, 4, 2, dilation=2, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)).flatten(1)


class _Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).flatten(1)


class _Linear(nn.Module):
    """Linear layers on flat features and on tokens ``[N, L, C]``, with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.a, self.b = nn.Linear(5, 4), nn.Linear(12, 6, bias=False), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.tokens(x).flatten(1)))


class _Affine(nn.Module):
    """Unfolded affines: BatchNorm (with ``fold_batchnorm=False``), a per-channel layer scale, a scalar scale, a
    constant shift, division by a constant, ``addcmul`` with constants."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.randn(4))
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(self.bn.weight)
        nn.init.normal_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)) * self.gamma.view(1, -1, 1, 1)
        h = (h * 0.5 + 1.0) / 3.0
        return torch.addcmul(self.gamma.view(1, -1, 1, 1), self.gamma.view(1, -1, 1, 1), h)


class _Pools(nn.Module):
    """Max pooling (padding, dilation, ``ceil_mode``, default stride, TF-'SAME' −∞ padding), average pooling
    (``count_include_pad``, ``ceil_mode``, ``divisor_override``), adaptive pooling to non-dividing sizes, spatial
    means and sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.max_pool2d(x, 3, stride=2, padding=1), F.max_pool2d(x, 2, ceil_mode=True),
                 F.max_pool2d(x, 3, stride=1, dilation=2), F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=-float("inf")), 2),
                 F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False), F.avg_pool2d(x, 2, ceil_mode=True),
                 F.avg_pool2d(x, 3, padding=1, divisor_override=4), F.avg_pool2d(x, (2, 3), stride=(1, 2)),
                 F.adaptive_avg_pool2d(x, (3, 2)), F.adaptive_avg_pool2d(x, 1)]
        pooled = torch.cat([p.flatten(1) for p in parts], 1)
        return pooled + x.mean((2, 3)).sum(1, keepdim=True) + x.mean((-1, -2), keepdim=True).flatten(1)[:, :1] \
            + x.sum((2, 3))[:, :1]


class _Sums(nn.Module):
    """Residual sums, a broadcast sum of two computed tensors, a sum over a short branch axis, ``cat`` along
    channels and a spatial axis (negative dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.a(x)
        h = h + self.b(h).mean((2, 3), keepdim=True)
        branches = torch.stack([h, self.b(h)], 1).sum(1)
        return torch.cat([torch.cat([branches, h], 1), torch.cat([x, x], -1)[..., :x.shape[-1]]], 1)


class _Shapes(nn.Module):
    """Every shape op: view, reshape, flatten, permute, transpose, (un)squeeze, clone/contiguous, slicing with
    negative/open bounds, split, chunk, unbind, ``stack``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1).contiguous().view(n, h * w, c).transpose(1, 2).reshape(n, c, h, w)
        y = y.clone()[:, 1:, :-1, 2:]
        a, b = torch.split(y, [1, 2], dim=1)
        p, q = b.chunk(2, dim=1)
        rows = torch.unbind(y, dim=2)
        z = torch.cat([a, q, p], 1).unsqueeze(2).squeeze(2)
        z = z[:, :, None].squeeze() if n > 1 else z
        return torch.cat([z.flatten(1), torch.stack(rows, -1).flatten(1), y.unsqueeze(-1).squeeze(-1).flatten(1)], 1)


class _Pads(nn.Module):
    """Zero padding, cropping (negative pads), 2-D reflect and replicate padding, nearest upsampling by a factor and
    to a size, bilinear upsampling with and without ``align_corners``, bicubic resampling, ``F.unfold``,
    ``repeat_interleave``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.pad(x, [1, 2, 0, 1]), F.pad(x, [-1, 0, 1, -2]), F.pad(x, [1, 2, 2, 1], mode="reflect"),
                 F.pad(x, [2, 0, 1, 1], mode="replicate"), F.interpolate(x, scale_factor=2.0, mode="nearest"),
                 F.interpolate(x, size=(7, 9), mode="nearest"),
                 F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
                 F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True),
                 F.interpolate(x, size=(6, 7), mode="bicubic", align_corners=False),
                 F.unfold(x, 2, dilation=1, padding=1, stride=1), F.unfold(x, (2, 3), stride=2),
                 x.repeat_interleave(3, dim=2), x.flatten(2).transpose(1, 2).repeat_interleave(2, dim=1)]
        return torch.cat([p.flatten(1) for p in parts], 1)


class _Activations(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fs = [torch.relu, nn.ReLU6(), lambda t: F.hardtanh(t, -1.5, 2.0), lambda t: F.leaky_relu(t, 0.1),
              lambda t: F.elu(t, 0.7), torch.sigmoid, torch.tanh, F.silu, F.gelu,
              lambda t: F.gelu(t, approximate="tanh"), F.hardswish, F.hardsigmoid, F.mish]
        return torch.cat([f(x).flatten(1) for f in fs], 1)


class _Gates(nn.Module):
    """Squeeze-excitation, an expanded gate from a 1-D conv (ECA), a same-shaped sigmoid gate on a 1×1 map, a gate
    upsampled to the value's size (GhostNetV2)."""

    def __init__(self) -> None:
        super().__init__()
        self.se, self.eca, self.g = nn.Conv2d(4, 4, 1), nn.Conv1d(1, 1, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        gate = torch.sigmoid(self.eca(x.mean((2, 3)).view(n, 1, c))).view(n, c, 1, 1)
        x = x * gate.expand_as(x)
        pooled = x.mean((2, 3), keepdim=True)
        one = pooled * torch.sigmoid(self.g(pooled))
        up = F.interpolate(torch.sigmoid(self.g(F.avg_pool2d(x, 2))), size=x.shape[-2:], mode="nearest")
        return torch.cat([(x * up).flatten(1), one.flatten(1)], 1)


class _Norms(nn.Module):
    """LayerNorm (channels-last), GroupNorm (affine and not), RMSNorm ``x·rsqrt(mean(x²) + ε)`` (written out and
    ``F.rms_norm``, with a weight and with the dtype's ε), SimpleNorm
    ``x·rsqrt(var(x) + ε)`` (a corrected variance), EvoNorm-S0's group std, ConvNeXt-V2's response norm."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import evo_norm
        from timm.layers.grn import GlobalResponseNorm

        self.ln, self.gn = nn.LayerNorm(4), nn.GroupNorm(2, 4)
        self.evo, self.grn = evo_norm.EvoNorm2dS0(4, groups=2), GlobalResponseNorm(4, channels_last=False)
        for p in (self.ln.weight, self.ln.bias, self.gn.weight, self.gn.bias, self.evo.v, self.evo.weight,
                  self.evo.bias, self.grn.weight, self.grn.bias):
            nn.init.normal_(p, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.gn(y) + F.group_norm(x, 2, eps=1e-3)
        y = y * torch.rsqrt(y.pow(2).mean(1, keepdim=True) + 1e-5)
        y = y * torch.rsqrt(y.var((1, 2), keepdim=True) + 1e-4)
        y = y + x * torch.rsqrt(x.var(1, correction=0, keepdim=True) + 1e-4)
        z = F.rms_norm(y.permute(0, 2, 3, 1), (4,), self.ln.weight, 1e-5) + F.rms_norm(y.permute(0, 2, 3, 1), (4, 4))
        return torch.cat([self.grn(self.evo(y)).flatten(1), z.flatten(1)], 1)


class _Softmax(nn.Module):
    """SKNet's branch attention (softmax over the branch axis) and GCNet's attention pooling (``values @ weights``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.attn, self.pool = (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1),
                                                nn.Conv2d(4, 8, 1), nn.Conv2d(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        branches = torch.stack([self.a(x), self.b(x)], dim=1)
        attn = self.attn(branches.sum(1).mean((2, 3), keepdim=True)).view(n, 2, c, 1, 1).softmax(1)
        y = (branches * attn).sum(1)
        weights = self.pool(y).view(n, 1, h * w).softmax(-1).unsqueeze(3)
        context = (y.view(n, c, h * w).unsqueeze(1) @ weights).view(n, c, 1, 1)
        return (y + context).flatten(1)


class _Attention(nn.Module):
    """Scaled dot-product attention (two heads, default and explicit scale) and multi-query attention (one key/value
    head broadcast over two query heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.q, self.kv = nn.Conv2d(4, 12, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, 2, c // 2, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, scale=0.3)
        q = self.q(x).reshape(n, 2, 2, h * w).transpose(-1, -2)
        k, v = self.kv(x).reshape(n, 1, 2, 2, h * w).transpose(-1, -2).unbind(2)
        b = F.scaled_dot_product_attention(q, k, v)
        return torch.cat([a.flatten(1), b.flatten(1)], 1)


class _Tokens(nn.Module):
    """A transformer's token plumbing: class, distillation and register tokens concatenated with the patch tokens
    (``with_tokens``), a position embedding, timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)`` (the batch moves to
    axis 1), sequence-first attention as torch's MultiheadAttention runs it (heads folded into the batch) and
    sequence-first tokens concatenated along axis 0, a
    difference of two computed tensors, ``x[:, 0]``, a mean over tokens, a gated MLP's product, a negation and
    ``type_as``; ``padding="same"`` convolutions with an even and an odd total."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.same = nn.Conv2d(3, 4, 2, stride=2), nn.Conv2d(3, 3, 2, padding="same")
        self.same_odd = nn.Conv2d(3, 3, 3, padding="same", dilation=2)
        self.cls, self.dist, self.reg = (nn.Parameter(torch.randn(1, 1, 4)), nn.Parameter(torch.randn(1, 1, 4)),
                                         nn.Parameter(torch.randn(1, 2, 4)))
        self.pos = nn.Parameter(torch.randn(1, 8, 4))
        self.qkv, self.mha = nn.Linear(4, 12), nn.MultiheadAttention(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.same_odd(self.same(x))
        t = self.embed(x).flatten(2).transpose(1, 2)                               # [N, 4, 4]
        t = torch.cat([self.cls.expand(n, -1, -1), self.dist.expand(n, -1, -1), t[:, :1],
                       self.reg.expand(n, -1, -1)[:, :1], t[:, 1:]], 1)   # tokens before, between and after
        t = torch.cat([t, self.reg[:, 1:].expand(n, -1, -1)], 1) + self.pos
        q, k, v = self.qkv(t).reshape(n, 8, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, 8, 4)
        s = t.transpose(0, 1)
        b = self.mha(s, s, s, need_weights=False)[0].transpose(0, 1)
        d = a - 0.5 * b
        gated = F.silu(d) * (-t).type_as(t)                                        # SwiGLU's product, a negation
        first = torch.cat([self.reg.transpose(0, 1).expand(-1, n, -1), s], 0)  # two tokens before, sequence-first
        return torch.cat([d[:, 0], (d - t).mean(1), gated[:, 1], first.mean(0)], 1)


class _WrittenAttention(nn.Module):
    """Attention written out, as timm's LeViT, EfficientFormer, CaiT and Swin write it: ``q @ kᵀ`` scaled, plus a
    position bias, reshaped to add a window mask and back, softmax, ``@ v``; talking heads (the logits and the
    weights mixed across heads by linear layers: a ``bilinear`` product); ``v @ aᵀ``; per-head temperatures on
    ``F.normalize``-d q and k; a masked SDPA; a roll and strided slices."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.mix_logits, self.mix_weights = nn.Linear(4, 12), nn.Linear(2, 2), nn.Linear(2, 2)
        self.bias = nn.Parameter(torch.randn(2, 6, 6))
        self.temperature = nn.Parameter(torch.rand(2, 1, 1) + 0.5)
        self.register_buffer("mask", torch.randn(3, 6, 6))
        self.register_buffer("keep", torch.rand(6, 6) > 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = torch.roll(x.flatten(2).transpose(1, 2), shifts=(2,), dims=(1,))       # [N, 6, 4]
        q, k, v = self.qkv(t).reshape(n, 6, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q @ k.transpose(-2, -1)) * 0.5 + self.bias
        windows = logits.view(-1, 3, 2, 6, 6) + self.mask.unsqueeze(1)[None, :n]   # [N/3, 3, heads, 6, 6]
        a = windows.view(-1, 2, 6, 6).softmax(-1) @ v
        heads = self.mix_logits((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
        b = self.mix_weights(heads.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) @ v
        c = v.transpose(-2, -1) @ ((q @ k.transpose(-2, -1)) / 3).softmax(-1).transpose(-2, -1)
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)            # XCiT's cross-covariance attention
        d = ((qn @ kn.transpose(-2, -1)) * self.temperature).softmax(-1) @ v
        e = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep) + F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.bias)
        out = torch.cat([a, b, c.transpose(-2, -1), d, e], -1)
        return torch.cat([out[:, :, ::2].flatten(1), out[..., 1:7:3].flatten(1)], 1)


class _Products(nn.Module):
    """Products of two computed tensors (gMLP's spatial gating, FocalNet's modulation broadcast both ways), a maximum
    over a dim (Hiera), 1-D average pooling (NextViT) and StarReLU's square of a ReLU (CAFormer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x), self.b(x)
        gated = u * v.flip(-1)
        modulated = u.mean((2, 3), keepdim=True) * v.mean(1, keepdim=True)
        peak = u.flatten(2).view(x.shape[0], 4, 2, -1).amax(2)
        pooled = F.avg_pool1d(v.flatten(2), 3, stride=2, padding=1, count_include_pad=False)
        star = 0.8 * torch.relu(u) ** 2 - 0.1 + torch.relu(v).square()
        return torch.cat([gated.flatten(1), modulated.flatten(1), peak.flatten(1), pooled.flatten(1), star.flatten(1)],
                         1)


class _ConstantMatrices(nn.Module):
    """Products with a constant matrix on either side (BoTNet's relative logits ``q @ rel_kᵀ``, SwiftFormer's
    ``q @ w_g``), a computed tensor expanded over a dim (BoTNet's logits copied over the query rows), overlapping
    sliding windows (``Tensor.unfold``, the HaloNets' key/value blocks) and a tensor divided by its own sum."""

    def __init__(self) -> None:
        super().__init__()
        self.rel, self.left = nn.Parameter(torch.randn(7, 5)), nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = x @ self.rel.t()
        left = self.left @ x
        copied = x.mean(2, keepdim=True).expand(-1, -1, 4, -1) + x
        blocks = F.pad(x, (1, 1, 1, 1)).unfold(2, 4, 2).unfold(3, 3, 2)   # the HaloNets' overlapping windows
        positive = torch.relu(x) + 0.5
        renormalised = positive / positive.sum(-1).unsqueeze(-1)          # ConViT's a / Σ_keys a
        return torch.cat([right.flatten(1), left.flatten(1), copied.flatten(1), blocks.flatten(1),
                          renormalised.flatten(1)], 1)


class _LinearAttention(nn.Module):
    """EfficientViT's ReLU linear attention (values padded with a column of ones, the output divided by the
    computed normaliser), MViTv2's decomposed relative positions (``einsum`` with a constant table per query row,
    ``byhwc,hkc->byhwk``, and with a plain constant matrix) written into a slice of the logits in place."""

    def __init__(self) -> None:
        super().__init__()
        self.rel_h, self.mix = nn.Parameter(torch.randn(4, 4, 5)), nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.relu(x), torch.relu(x.flip(-1)), x               # [B, 3, 4·4 tokens, 5]
        out = q @ (k.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0))
        attended = out[..., :-1] / (out[..., -1:] + 1e-3)
        rel = torch.einsum("byhwc,hkc->byhwk", x.reshape(x.shape[0], 3, 4, 4, 5), self.rel_h)
        logits = x @ x.transpose(-1, -2)                                   # [B, 3, 16, 16]
        logits[:, :, 4:, 1:5] = logits[:, :, 4:, 1:5] + rel.reshape(x.shape[0], 3, 16, 4)[:, :, 4:]
        mixed = torch.einsum("bntc,dc->bntd", x, self.mix)
        return torch.cat([attended.flatten(1), logits.flatten(1), mixed.flatten(1)], 1)


class _Outlook(nn.Module):
    """VOLO's outlook attention (patches unfolded, mixed, folded back with their overlaps summed: ``F.fold``), its
    token-labelling head's maximum over tokens (``max(dim)``'s values), and CSATv2's reordering by constant indices
    (a repeated index; a 2-D index)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("order", torch.tensor([5, 0, 2, 2, 1]))
        self.register_buffer("pairs", torch.tensor([[1, 0], [2, 2]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, 3, padding=1, stride=2)                    # [B, C·9, L]
        mixed = torch.relu(patches) * patches.flip(1)
        folded = F.fold(mixed, x.shape[-2:], 3, padding=1, stride=2)
        return torch.cat([folded.flatten(1), folded.flatten(2).max(2)[0], folded[:, :, :, self.order].flatten(1),
                          folded[:, self.pairs].flatten(1)], 1)


class _TransposedConvs(nn.Module):
    """Transposed convolutions (LowFormer's upsampling), canonical as zero insertion, padding or cropping and a
    convolution: strides 1–3, padding above the kernel's reach (a crop), output padding, groups, dilation, 1-D."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1)
        self.b = nn.ConvTranspose2d(6, 4, 3, stride=3, padding=2, output_padding=1, groups=2, dilation=2)
        self.c = nn.ConvTranspose2d(4, 2, 3, padding=3, bias=False)
        self.d = nn.ConvTranspose1d(4, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.c(self.b(self.a(x)))
        return torch.cat([up.flatten(1), self.d(x.flatten(2)).flatten(1)], 1)


class _LatentAttention(nn.Module):
    """Attention from a learned latent query (NaFlexViT's MAP head: a constant query, one linear map of the keys per
    head) and attention whose float mask is computed from the queries (SAM's relative positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.latent, self.rel = nn.Parameter(torch.randn(1, 3, 2, 5)), nn.Parameter(torch.randn(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # x: [B, 3 heads, 4 tokens, 5]
        pooled = F.scaled_dot_product_attention(self.latent.expand(x.shape[0], -1, -1, -1), x, torch.relu(x))
        bias = x @ self.rel.t()                                          # [B, 3, 4 queries, 4 keys]
        biased = F.scaled_dot_product_attention(x, x.flip(2), x, attn_mask=bias)
        return torch.cat([pooled.flatten(1), biased.flatten(1)], 1)


class _BatchedConstants(nn.Module):
    """Products with a constant of more than two dims (LambdaNets' relative position embeddings, one matrix per query
    position), broadcast both ways: ``E[1, p, k, j] @ v[B, 1, j, d]`` and ``x[B, 3, m, k] @ W[3, k, n]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.per_head = nn.Parameter(torch.randn(1, 4, 2, 5)), nn.Parameter(torch.randn(3, 4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # x: [B, 3, 5, 4]
        left = self.emb.expand(1, -1, -1, -1) @ x[:, :1]                  # [B, 4, 2, 4]
        right = x @ self.per_head                                         # [B, 3, 5, 2]
        return torch.cat([left.flatten(1), right.flatten(1)], 1)


#: name → (model, example input, fold_batchnorm)
class _DifferentialScale(nn.Module):
    """Differential attention's λ (timm's ``DiffAttention``): a scalar computed from parameters alone, cast by
    ``type_as`` to a computed tensor's dtype, weighting the difference of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.q, self.k = nn.Parameter(torch.randn(4) * 0.1), nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a(x)
        lam = (torch.exp((self.q * self.k).sum(-1)) - 0.2).type_as(u)
        return u - lam * self.b(x)


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, bool]]] = {
    "convs": lambda: (_Convs(), _x(2, 3, 9, 9), True),
    "conv1d": lambda: (_Conv1d(), _x(2, 3, 12), True),
    "conv3d": lambda: (_Conv3d(), _x(2, 2, 3, 5, 5), True),
    "linear": lambda: (_Linear(), _x(2, 3, 5), True),
    "affine": lambda: (_Affine(), _x(2, 3, 6, 6), False),
    "pools": lambda: (_Pools(), _x(2, 3, 7, 9), True),
    "sums": lambda: (_Sums(), _x(2, 3, 5, 5), True),
    "shapes": lambda: (_Shapes(), _x(2, 4, 4, 5), True),
    "pads": lambda: (_Pads(), _x(2, 2, 4, 5), True),
    "activations": lambda: (_Activations(), _x(2, 3, 4, 4, scale=3.0), True),
    "gates": lambda: (_Gates(), _x(2, 4, 4, 4), True),
    "norms": lambda: (_Norms(), _x(2, 4, 4, 4), True),
    "softmax": lambda: (_Softmax(), _x(2, 4, 4, 4), True),
    "attention": lambda: (_Attention(), _x(2, 4, 3, 3), True),
    "tokens": lambda: (_Tokens(), _x(2, 3, 4, 4), True),
    "written_attention": lambda: (_WrittenAttention(), _x(3, 4, 2, 3), True),
    "products": lambda: (_Products(), _x(2, 3, 4, 6), True),
    "constant_matrices": lambda: (_ConstantMatrices(), _x(2, 3, 4, 5), True),
    "linear_attention": lambda: (_LinearAttention(), _x(2, 3, 16, 5), True),
    "outlook": lambda: (_Outlook(), _x(2, 3, 5, 6), True),
    "transposed_convs": lambda: (_TransposedConvs(), _x(2, 4, 3, 4), True),
    "latent_attention": lambda: (_LatentAttention(), _x(2, 3, 4, 5), True),
    "batched_constants": lambda: (_BatchedConstants(), _x(2, 3, 5, 4), True),
    "differential_scale": lambda: (_DifferentialScale(), _x(2, 3, 4, 4), True),
}


def _one_node(target: Any, shape: tuple[int, ...], *args: Any) -> tuple[fx.GraphModule, torch.Tensor]:
    """A canonical graph of one ``target`` node applied to an input shaped ``shape``."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["fxrel_kind"] = ops.INPUT
    node = graph.call_function(target, (x, *args))
    node.meta["fxrel_kind"] = ops.OP_SPECS[target].kind
    graph.output(node)
    gm = fx.GraphModule(nn.Module(), graph)
    example = _x(*shape)
    ShapeProp(gm).propagate(example)
    return gm, example


#: targets that canonicalisation maps elsewhere or capture decomposes away, as one-node graphs
_DIRECT: dict[str, Callable[[], tuple[fx.GraphModule, torch.Tensor]]] = {
    "unsafe_view": lambda: _one_node(aten._unsafe_view.default, (2, 3, 4), [2, 12]),
    "flatten": lambda: _one_node(aten.flatten.using_ints, (2, 3, 2, 2), 1),
    "alias": lambda: _one_node(aten.alias.default, (2, 3, 2)),
    "squeeze": lambda: _one_node(aten.squeeze.default, (2, 1, 3, 1)),
    "squeeze_dims": lambda: _one_node(aten.squeeze.dims, (2, 1, 3, 1), [1, 3]),
    "squeeze_dim": lambda: _one_node(aten.squeeze.dim, (2, 3, 1), -1),
    "unsqueeze": lambda: _one_node(aten.unsqueeze.default, (2, 3), -1),
    "permute_negative": lambda: _one_node(aten.permute.default, (2, 3, 4), [0, -1, 1]),
    "view": lambda: _one_node(aten.view.default, (2, 3, 4), [2, 4, 3]),
}


#: cases whose model computes in float32 where the canonical graph keeps float64
_FLOAT32_STATISTICS = {"norms"}


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


@functools.cache
def _graph(case: str) -> tuple[fx.GraphModule, dict[fx.Node, Any]]:
    if case in CASES:
        torch.manual_seed(0)
        model, x, fold = CASES[case]()
        model = model.eval().double()
        gm = canonicalize(capture(model, x), (x,), fold)
        with torch.no_grad():
            expected = model(x)
    else:
        gm, x = _DIRECT[case]()
        expected = None
    recorder = _Recorder(gm)
    recorder.values = {}
    with torch.no_grad():
        out = recorder.run(x)
    if expected is not None:   # the canonical graph is the model (EvoNorm computes its statistic in float32)
        assert rel_error(out, expected) < (1e-6 if case in _FLOAT32_STATISTICS else 1e-12), case
    return gm, recorder.values


def _target_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else target.__name__


@functools.cache
def _nodes_by_target() -> dict[Any, list[tuple[str, str]]]:
    """target → [(case, node name)] over all cases."""
    found: dict[Any, list[tuple[str, str]]] = {}
    for case in (*CASES, *_DIRECT):
        gm, _ = _graph(case)
        for node in gm.graph.nodes:
            if node.op == "call_function":
                found.setdefault(node.target, []).append((case, node.name))
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float64 rounding (−∞ padding included)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b[b.isfinite()].abs().max()))


def _check_vjp(case: str, node: fx.Node, values: dict[fx.Node, Any], seed: int) -> None:
    spec = ops.spec_of(node)
    inputs = spec.inputs(node)
    leaves = {a: values[a].detach().clone().requires_grad_(True) for a in dict.fromkeys(inputs)}
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: leaves.get(a, values[a]))
    with torch.enable_grad():
        out = node.target(*args, **kwargs)
    assert _same(out.detach(), values[node])
    grad = _x(*out.shape, seed=seed)
    expected = torch.autograd.grad(out, list(leaves.values()), grad, allow_unused=True)

    weight = bias = None
    weight, bias = (values[p] if p is not None else None for p in ops.weight_and_bias(node))  # as the builder does
    assert _same(spec.forward(node, [values[a] for a in inputs], weight, bias), values[node])
    got = spec.vjp(node, grad, [values[a] for a in inputs], weight)
    assert len(got) == len(inputs), f"{case}/{node.name}: {len(got)} cotangents for {len(inputs)} inputs"
    summed: dict[fx.Node, torch.Tensor] = {}
    for a, g in zip(inputs, got):   # an input used twice receives the sum
        summed[a] = summed[a] + g if a in summed else g
    for (a, leaf), reference in zip(leaves.items(), expected):
        reference = torch.zeros_like(leaf) if reference is None else reference
        assert summed[a].shape == reference.shape, f"{case}/{node.name} → {a.name}: shape {summed[a].shape}"
        error = rel_error(summed[a], reference)
        assert error < TOL, (f"{case}: VJP of {node.name} = {node.target}{node.args[1:]} w.r.t. {a.name} is off by "
                             f"{error:.2e} (relative)")

    if spec.per_sample is not None and weight.dim() == 4:
        _check_per_sample(case, node, spec.per_sample, values[inputs[0]], weight, grad)


def _check_per_sample(case: str, node: fx.Node, per_sample: ops.PerSample, x: torch.Tensor, weight: torch.Tensor,
                      grad: torch.Tensor) -> None:
    """Per-sample weights (RSP's ν): the same op for every sample's copy of W, its VJP, and the weight VJP against
    autograd of each sample's convolution."""
    n = x.shape[0]
    weights = weight.expand(n, *weight.shape).clone()
    plain = ops.spec_of(node).forward(node, [x], weight, None)
    assert rel_error(per_sample.forward(node, [x], weights), plain) < TOL, case
    x_leaf = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(ops.spec_of(node).forward(node, [x_leaf], weight, None), x_leaf, grad)
    assert rel_error(per_sample.vjp(node, grad, [x], weights)[0], reference) < TOL, case
    w_leaf = weights.clone().requires_grad_(True)
    out = torch.cat([ops.spec_of(node).forward(node, [x[i:i + 1]], w_leaf[i], None) for i in range(n)])
    (reference,) = torch.autograd.grad(out, w_leaf, grad)
    assert rel_error(per_sample.weight_vjp(node, grad, [x]), reference) < TOL, case


def _spec_id(target: Any) -> str:
    return f"{ops.OP_SPECS[target].kind}-{_target_name(target)}"


@pytest.mark.parametrize("target", list(ops.OP_SPECS), ids=_spec_id)
def test_vjp_equals_autograd(target):
    """Every canonical node of this target, in every case, has the VJP autograd gives."""
    occurrences = _nodes_by_target().get(target, [])
    assert occurrences, f"no case exercises the canonical target {_target_name(target)}: add one to CASES or _DIRECT"
    for i, (case, name) in enumerate(occurrences):
        gm, values = _graph(case)
        node = next(n for n in gm.graph.nodes if n.name == name)
        _check_vjp(case, node, values, seed=100 + i)


def test_every_kind_with_a_vjp_is_covered():
    """Every kind of :data:`ops.KINDS` that has an op spec (a VJP) occurs in some case, and every node the cases
    produce is canonical."""
    with_vjp = {spec.kind for spec in ops.OP_SPECS.values()}
    covered = set()
    for case in (*CASES, *_DIRECT):
        gm, _ = _graph(case)
        for node in gm.graph.nodes:
            if node.op == "call_function":
                assert node.target in ops.OP_SPECS, f"{case}: {node.name} ({node.target}) has no op spec"
                assert node.meta["fxrel_kind"] == ops.OP_SPECS[node.target].kind
                covered.add(node.meta["fxrel_kind"])
    missing = (set(ops.KINDS) & with_vjp) - covered
    assert not missing, f"kinds without a case: {sorted(missing)}"
    assert set(ops.KINDS) <= with_vjp, f"kinds without an op spec: {sorted(set(ops.KINDS) - with_vjp)}"
    assert set(ops.OP_SPECS) <= set(_nodes_by_target()), "targets without a case: " + ", ".join(
        _target_name(t) for t in set(ops.OP_SPECS) - set(_nodes_by_target()))


@pytest.mark.parametrize("case", [*CASES, *_DIRECT])
def test_every_case_canonicalises(case):
    """Each case builds (and, for captured models, its canonical graph reproduces the model)."""
    gm, values = _graph(case)
    assert any(n.op == "call_function" for n in gm.graph.nodes)
