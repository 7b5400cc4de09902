"""SRD: sharing ratio decomposition (Han, Kim, Kwak, ICLR 2024; ``specs/srd.md``, section numbers below refer to it).

Relevance belongs to pointwise feature vectors (PFVs: the channel vector at one position) and to *pre-activation*
PFVs. Between two activations the pre-activation ``v_j`` is a sum of affine pieces of the post-activation sources,
``v_j = Σ_i v̂_{i→j}``, and each piece gets the share ``μ_{i→j} = ⟨v̂_{i→j}, v_j⟩ / ‖v_j‖²`` (Eq. 6; ``Σ_i μ = 1``) of
``R_j`` (Eq. 7–8). The sweep carries the relevance as a *cotangent* ``S`` shaped like each node's output, with the
PFV's relevance ``R_j = ⟨v_j, S_j⟩`` (§4), so that every linear piece is one vector–Jacobian product:

* **activation** (the stage boundary, any pointwise activation, App. G): ``R_j = ⟨y_j, S_j⟩`` at the output ``y``;
  ``S ← z_j R_j / ‖z_j‖²`` at the pre-activation ``z`` (Eq. 6's target vector);
* **conv** (App. B, Eq. 11; BatchNorm folded in): the weight pieces ``W_tap x_i`` take ``⟨x_i, f*(W; S)_i⟩`` — the
  exact VJP — and the bias ``b`` takes ``β_j = ⟨b, S_j⟩``, shared among the taps of ``j`` by the norm of their
  pieces ``‖W_tap x_src‖`` (``bias_norm="piece"``, the official code) or of their sources ``‖x_src‖``
  (``"source"``, the paper), all taps at once with one convolution by a tap-expanded kernel; a source's share
  ``r_i`` enters its cotangent as ``x_i r_i / ‖x_i‖²``. A conv that reads a **max-pool** (the maxpool-conv(-BN)
  composites, Eq. 12–13) shares it over every (pool offset × tap) piece ``W_tap x_q^{(o)}``, ``x_q^{(o)}`` the
  channels of the pooled PFV whose maximum lies at window offset ``o``; a piece's share enters as
  ``x_q^{(o)} r / ‖x_q^{(o)}‖²``, which the pool's VJP brings to that offset's source PFV alone;
* **BatchNorm left unfolded, linear layers** — one piece per PFV: the VJP plus the whole bias share;
* **max pooling** (Eq. 12–13) — the VJP through the recorded argmax indicators (channel by channel); **average
  pooling, padding, shape ops** — their VJP; **residual sums** — both operands get ``S`` (the parallel paths' pieces
  against the same target, summed at the fork, §2); **concatenation** — slicing: a block's share is
  ``⟨v_block, S⟩``, the sharing ratio of a channel block.

``Σ R`` is kept exactly from stage to stage (§6.2; positions with ``v_j = 0`` hold no relevance), for any sign of
``R``. The returned relevance at a node with value ``v`` is ``v ⊙ S``: its channel sum is the PFV map.

**The stage that reads the image**, ``input_bias``: ``"shared"`` (paper and code) gives the first convolution's
bias share ``μ_b = ⟨b, v_j⟩/‖v_j‖²`` of ``R_j`` to the pixels by norm, like every other stage; ``"absorbed"``
(default) keeps it with the bias, so the pixels receive the weight pieces' shares only and ``Σ R`` at the image is
``Σ R`` at the first PFVs less ``Σ_j μ_b R_j``. The reason: with BatchNorm folded into that convolution its bias
nearly cancels the sum of the pixel pieces (BatchNorm centres the pre-activations), so ``μ_b`` and ``1 − μ_b`` are
large and of opposite signs, and spreading the bias's part by the pixels' norms — a class-blind weighting — puts
positive relevance on the other objects. Measured on zoo-densenet (``contrast="spatial_mean"``): class
discrimination 0.970 at the first PFVs, 0.901 at the image with the bias shared, 0.937 with it absorbed; the hidden
stages keep it (0.97 → 0.97).

The initial sharing ratio ``μ^{L→O}`` at the encoder output ``X`` (``layer=None``: the last spatial feature map,
as for RSP; §2 "Top"), ``init``:

* ``"paper"`` (Eq. 4) — ``max(Φ^t − mean_k Φ^k, 0)`` with ``Φ^k = Σ_c α^k_c A_c``, ``α^k = mean_ij ∂y_k/∂A`` (every
  class's gradient, one class-batched helper sweep);
* ``"logit_share"`` (the official ResNet code) — the exact share of each position in the logit:
  ``Σ_c A ⊙ ∂y_t/∂A`` plus an even share of the rest ``y_t − Σ A ⊙ ∂y_t/∂A`` (the classifier's bias, for
  GAP + linear heads), so ``Σ μ = y_t``;
* ``"grad_cam"`` (the official VGG code) — ``ReLU(Σ_c α^t_c A_c)``;

``contrast="spatial_mean"`` subtracts the map's spatial mean (the official "contrastive SRD"; the default for the
two official initialisations, ``"auto"``), ``"none"`` leaves it (and is the only choice with ``paper``).

The defaults — ``init="logit_share"``, the spatial-mean contrast, ``input_bias="absorbed"`` — are what holds on the
evaluation zoo (``fxrel fidelity --methods srd``, 12 scenes, 29 pairs; class discrimination against Grad-CAM at the
same layer X, which SRD is compared with): the paper's Eq. 4 with shared biases (``init="paper",
input_bias="shared"``) reaches 0.71–0.90, below Grad-CAM's 0.81–0.93 on every model, because its clamped,
non-negative initial map has no negative evidence on the other objects to carry down, and every stage's sharing
spreads its positive relevance to them (zoo-resnet: 0.88 at X, 0.78 at the image; the signed logit share keeps
0.91 → 0.90). The defaults give 0.876–0.956, above Grad-CAM on all six models.
The even shares (the rest, the mean) are taken over the live positions of X: a PFV that is zero after the ReLU
holds no relevance here (the official code attaches its bias share to the pre-activation behind it). Elsewhere the
maps vanish at zero PFVs by construction.

Transformers: as RSP, SRD enters at a CNN's last feature map and raises a ``RuleError`` on a vision transformer, whose
last spatial map is the patch embedding below all its attention (:func:`fxrel.graphs.analysis.feature_layer`).
"""
from __future__ import annotations

from typing import Any, Collection

import torch
import torch.nn.functional as F
from torch import fx

from fxrel.catalog.method import EnteringMethod
from fxrel.catalog.registry import register
from fxrel.catalog.rgam import class_gradients
from fxrel.catalog.sectional import NotDecomposed
from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.graphs.builder import Stream
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, kind, reads_input
from fxrel.rules.generic import divide
from fxrel.rules.gradient import AttentionAsWeights, GateAsWeight, Gradient

BIAS_NORMS = ("piece", "source")
INITS = ("paper", "logit_share", "grad_cam")
CONTRASTS = ("none", "spatial_mean")
INPUT_BIASES = ("absorbed", "shared")
aten = torch.ops.aten


def _pfv(t: Any, s: Any) -> Any:
    """``⟨t_j, s_j⟩`` per position, ``[N, 1, …]``."""
    return (t * s).sum(1, keepdim=True)


def to_cotangent(value: Any, relevance: Any) -> Any:
    """The cotangent ``v_j R_j / ‖v_j‖²`` that gives each PFV ``v_j`` the relevance ``R_j`` (0 where ``v_j = 0``)."""
    return value * divide(relevance, _pfv(value, value), 0.0)


# --- rules -------------------------------------------------------------------------------------------------------
class PreActivation(Rule):
    """The stage boundary: the relevance ``⟨y_j, S_j⟩`` of the post-activation PFV moves to the pre-activation."""

    kinds = frozenset({ops.ACTIVATION})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return [to_cotangent(ctx.inputs[0], _pfv(ctx.output, relevance))]


class OnePiece(Rule):
    """A node whose output PFV is one affine piece of its input PFV (unfolded BatchNorm, linear layer): the VJP and
    the whole bias share ``⟨b, S_j⟩``."""

    kinds = frozenset({ops.AFFINE, ops.LINEAR})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (grad,) = ctx.vjp(relevance)
        if ctx.bias is None:
            return [grad]
        # the bias broadcasts from the right: a per-channel (C, 1, 1), a linear layer's (C,), LayerNorm's channels-last
        # (C,), or a scalar
        return [grad + to_cotangent(ctx.inputs[0], _pfv(ctx.bias.expand_as(relevance), relevance))]


def _tap_kernel(shape: torch.Size) -> torch.Tensor:
    """``E[t, 0, u, v] = 1[t = (u, v)]``: one output channel per kernel tap."""
    taps = shape[0] * shape[1]
    return torch.eye(taps).view(taps, 1, *shape)


def _tap_expanded(groups: int):
    """Build-time: the kernel with one copy per tap holding only that tap, ``[g·taps·Cout/g, Cin/g, kh, kw]``
    (group-major, so a grouped convolution keeps its groups)."""
    def expand(weight: torch.Tensor) -> torch.Tensor:
        cout, cin, kh, kw = weight.shape
        taps = _tap_kernel((kh, kw)).to(weight).view(1, kh * kw, 1, 1, kh, kw)
        per_group = weight.view(groups, 1, cout // groups, cin, kh, kw) * taps
        return per_group.reshape(groups * kh * kw * (cout // groups), cin, kh, kw)
    return expand


def pool_pieces(pool: fx.Node, pooled: Any) -> list[Any]:
    """Eq. 12: the max-pool's output ``x_q`` split by where each channel's maximum lies in the window of ``q``,
    ``x_q^{(o)} = 1[argmax(q, c) = o] ⊙ x_q`` for every window offset ``o`` (the recorded argmax indices, channel by
    channel; ``Σ_o x^{(o)} = x``). Each ``(q, o)`` is its own piece, so overlapping windows are no special case.

    The offset is labelled by the argmax's row and column modulo the window's extent ``d·k``, which differ between
    the ``k`` positions ``start + d·a`` of every window (``(d·k)²`` labels; ``k²`` for an undilated pool)."""
    kernel, stride, padding, dilation, ceil = ops._pool_args(pool)
    source = fx.Proxy(pooled.node.args[0], pooled.tracer)      # the pool's input in the recomputed forward pass
    _, indices = aten.max_pool2d_with_indices.default(source, kernel, stride, padding, dilation, ceil)
    width = pool.args[0].meta["tensor_meta"].shape[-1]
    extent = [d * k for d, k in zip(dilation, kernel)]
    offset = (indices // width) % extent[0] * extent[1] + (indices % width) % extent[1]
    return [pooled * (offset == o) for o in range(extent[0] * extent[1])]


class ConvSharing(Rule):
    """App. B for a convolution: the weight pieces by VJP, the bias shared among the pieces by norm.

    For output ``j`` with ``β_j = ⟨b, S_j⟩`` and pieces ``p`` with norms ``n_p(j)`` the source ``i`` of ``p`` receives
    ``r_i = Σ_{(j, p) → i} β_j n_p(j) / Σ_p' n_p'(j)``, in its cotangent as ``x_i r_i / ‖x_i‖²``. The pieces are the
    taps, ``W_tap x_src`` (``n = ‖W_tap x_src‖``, ``bias_norm="piece"``, or ``‖x_src‖``, ``"source"``; Eq. 11), and
    for a convolution that reads a max-pool (``cal_simmap_mcr``/``mcbr``, BatchNorm folded) every (pool offset ×
    tap) pair ``W_tap x_src^{(o)}`` (:func:`pool_pieces`; ``n = ‖W_tap x_src^{(o)}‖`` or ``‖x_src^{(o)}‖``): the
    share of ``(q, o)`` enters the cotangent as ``x_q^{(o)} r_{q,o} / ‖x_q^{(o)}‖²``, which the pool's VJP sends to
    the argmax positions of offset ``o``, i.e. to the source PFV ``s_p·q + o − π_p`` alone."""

    kinds = frozenset({ops.CONV})

    def __init__(self, bias_norm: str = "piece", absorb_bias: bool = False) -> None:
        if bias_norm not in BIAS_NORMS:
            raise RuleError(f"bias_norm must be one of {BIAS_NORMS}, got {bias_norm!r}")
        self.bias_norm, self.absorb_bias = bias_norm, absorb_bias

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (grad,) = ctx.vjp(relevance)
        if ctx.bias is None or self.absorb_bias:   # absorbed: the bias's share μ_b R_j stays with the bias
            return [grad]
        x, node = ctx.inputs[0], ctx.node
        kernel = ops.conv_geometry(node).kernel
        if len(kernel) != 2:
            raise RuleError(f"SRD's bias shares are implemented for 2-D convolutions; node '{node.name}' is "
                            f"{len(kernel)}-D (module '{node.meta.get('fxrel_module', '')}')")
        pooled = node.args[0].target is aten.max_pool2d.default   # a max over dims (amax) is no pooling window
        sources = pool_pieces(node.args[0], x) if pooled else [x]
        norms = [self._norms(ctx, source) for source in sources]                        # each [N, taps, Ho, Wo]
        total = sum((n.sum(1, keepdim=True) for n in norms[1:]), norms[0].sum(1, keepdim=True))
        share = _pfv(ctx.bias.view(1, -1, 1, 1).expand_as(relevance), relevance)        # β_j = ⟨b, S_j⟩
        for source, n in zip(sources, norms):
            grad = grad + to_cotangent(source, _to_sources(ctx, divide(share * n, total, 0.0)))
        return [grad]

    def _norms(self, ctx: RuleContext, x: Any) -> Any:
        """``n_tap(j)``, ``[N, taps, Ho, Wo]``: the norm of each tap's piece ``‖W_tap x_src‖`` or of its source."""
        node, g = ctx.node, ops.conv_geometry(ctx.node)
        if self.bias_norm == "source":
            return F.conv2d(_pfv(x, x).sqrt(), ctx.constant(_tap_kernel(g.kernel)), None, g.stride, g.padding,
                            g.dilation)
        pieces = ctx.forward([x], ctx.param("weight", f"taps{g.groups}", _tap_expanded(g.groups)))
        out = node.meta["tensor_meta"].shape
        pieces = pieces.view(-1, g.groups, g.kernel[0] * g.kernel[1], out[1] // g.groups, *out[2:])
        return (pieces * pieces).sum((1, 3)).sqrt()

    def __repr__(self) -> str:
        return f"ConvSharing({'absorb_bias=True' if self.absorb_bias else f'bias_norm={self.bias_norm!r}'})"


def _to_sources(ctx: RuleContext, per_tap: Any) -> Any:
    """``[N, taps, Ho, Wo] → [N, 1, H, W]``: each tap's share summed at its source position (padding drops it)."""
    g = ops.conv_geometry(ctx.node)
    return F.conv_transpose2d(per_tap, ctx.constant(_tap_kernel(g.kernel)), None, g.stride, g.padding,
                              g.transpose_padding(), 1, g.dilation)


def srd_composite(bias_norm: str = "piece", input_bias: str = "absorbed") -> Composite:
    """SRD's rule set below the encoder output (see the module docstring)."""
    if input_bias not in INPUT_BIASES:
        raise RuleError(f"input_bias must be one of {INPUT_BIASES}, got {input_bias!r}")
    input_stage = [(reads_input(ops.CONV), ConvSharing(absorb_bias=True))] if input_bias == "absorbed" else []
    return Composite(input_stage + [
        (kind(ops.ACTIVATION), PreActivation()),
        (kind(ops.CONV), ConvSharing(bias_norm)),
        (kind(ops.AFFINE, ops.LINEAR), OnePiece()),
        (kind(*ops.SUM_KINDS), Gradient()),
        (kind(ops.GATE), GateAsWeight(cotangent=True)), (kind(ops.ATTEND), AttentionAsWeights(cotangent=True)),
    ], f"srd[bias_norm={bias_norm}, input_bias={input_bias}]", default=NotDecomposed("SRD"))


# --- the initial sharing ratio at X ------------------------------------------------------------------------------
class InitialSharing:
    """``μ^{L→O}`` at layer X (Eq. 4 and the official alternatives), as the SRD stream's entry seed there."""

    stream = "srd_gradient"

    def __init__(self, init: str = "logit_share", contrast: str | None = "auto") -> None:
        if init not in INITS:
            raise RuleError(f"init must be one of {INITS}, got {init!r}")
        if contrast is None:   # ``contrast=none`` in a method spec parses to None
            contrast = "none"
        if contrast == "auto":   # the default: the official "contrastive SRD", which Eq. 4 already is
            contrast = "none" if init == "paper" else "spatial_mean"
        if contrast not in CONTRASTS:
            raise RuleError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
        if init == "paper" and contrast != "none":
            raise RuleError("init='paper' already contrasts with the class mean (Eq. 4); contrast= is for the "
                            "official-code initialisations 'logit_share' and 'grad_cam'")
        self.init, self.contrast = init, contrast

    def helpers(self, graph: fx.GraphModule, above: Collection[str]) -> list[Stream]:
        return [class_gradients(self.stream, graph, above, every_class=self.init == "paper")]

    def __call__(self, logits: Any, mask: Any, activation: Any, arrived: dict[str, Any]) -> Any:
        gradient = arrived[self.stream]
        if self.init == "paper":
            alpha = gradient.mean((2, 3)).view(mask.size(1), mask.size(0), -1)               # [K, N, C]
            maps = (activation.unsqueeze(0) * alpha[..., None, None]).sum(2, keepdim=True)  # Φ^k, [K, N, 1, H, W]
            target = (mask.t()[..., None, None, None] * maps).sum(0)
            ratio = (target - maps.mean(0)).clamp(min=0)
        elif self.init == "grad_cam":
            ratio = _pfv(activation, gradient.mean((2, 3), keepdim=True).expand_as(activation)).clamp(min=0)
        else:
            ratio = _pfv(activation, gradient)
        # the even shares go to the live PFVs only: a zero PFV at X holds no relevance (R_j = ⟨A_j, S_j⟩)
        live = (_pfv(activation, activation) > 0).to(ratio.dtype)
        count = live.sum((2, 3), keepdim=True)
        if self.init == "logit_share":
            rest = (logits * mask).sum(1, keepdim=True) - ratio.flatten(1).sum(1, keepdim=True)
            ratio = ratio + live * divide(rest.view(-1, 1, 1, 1), count, 0.0)
        if self.contrast == "spatial_mean":
            ratio = ratio - live * divide(ratio.sum((2, 3), keepdim=True), count, 0.0)
        return to_cotangent(activation, ratio)

    def __repr__(self) -> str:
        return f"InitialSharing(init={self.init!r}, contrast={self.contrast!r})"


def pfv_relevance(relevance: Any, value: Any) -> Any:
    """What a stop returns: ``v ⊙ S`` (its channel sum is each PFV's relevance)."""
    return value * relevance


SRD_OUTPUT = ("signed, shaped like the stop node (input: like the image); its channel sum is the PFV map; Σ = Σ of "
              "the initial sharing ratio at layer X, kept exactly by every stage")


@register("srd", "sharing ratio decomposition: relevance of pre-activation pointwise feature vectors, shared by "
          "⟨piece, PFV⟩/‖PFV‖² through every conv, pooling, sum and concatenation below the encoder output",
          "Han, Kim, Kwak 2024 (SRD)", SRD_OUTPUT)
def _srd(init: str = "logit_share", contrast: str | None = "auto", bias_norm: str = "piece",
         input_bias: str = "absorbed", layer: str | None = None) -> EnteringMethod:
    return EnteringMethod("srd", srd_composite(bias_norm, input_bias), InitialSharing(init, contrast),
                           pfv_relevance, layer=layer)
