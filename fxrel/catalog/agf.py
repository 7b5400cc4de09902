"""AGF: attribution guided factorization (Gur, Ali, Wolf, AAAI 2021; ``specs/agf.md``, section numbers below refer to
it) — two streams in one reverse sweep.

* the **gradient stream** (a helper, not returned): exact VJPs of the score ``s``;
* the **attribution stream** Φ, whose rule at every conv/linear node reads what the gradient stream sent to the
  node's input (``∇x``, unmasked) and arrived at its output (for the masked gradient ``f*(∇y ⊙ 1[Φ≠0])``).

Both start from ``∂s/∂Y`` at the logits ``Y``: ``score="logit"`` (default), ``s = y_t`` and ``∂s/∂Y = e_t``;
``score="softmax_gaussian"`` (the paper, §2, Alg. 1 lines 2–4)::

    σ = max_k |Y_k − y_t|,   s = ŷ_t,   ŷ = softmax_k( y_t · exp(−½((Y_k − y_t)/σ)²) )

computed in closed form (:func:`softmax_gaussian_gradient`; the relevance graph has no autograd). Rules per node:

* **last conv/linear layer** (the classifier, "first" from the top) — ``Φ = x ⊙ ∇x`` (Eq. 8, Alg. 1 line 4); nodes
  after it (a 1×1-conv classifier's pooling, reshapes) pass the exact gradient;
* **conv** (§4.2, Eq. 9–14) — the absolute influence ``C = G(|x|, |θ|, Φ)`` (Eq. 9), the input-agnostic influence
  ``A = G(1, |θ|, Φ)`` (Eq. 10), the guided factorizations ``F_x = F̄(x, φ)⁺``, ``F_∇x = F̄(∇x_masked, φ)⁺`` with
  ``φ = mean_c C`` (Eq. 11, :mod:`fxrel.rules.factorization`), the interaction ``M = N_max(mean_c(x ⊙ ∇x)⁺)``
  (Eq. 12), the residual ``r`` and the Δ-shift ``Φ_in = C + r − (Σr / N_nz(C)) · 1[C≠0]`` (Def. 2, Eq. 14;
  :func:`fxrel.rules.shift.uniform_shift`), which keeps ``Σ Φ_in = Σ C = Σ Φ_out``. The residual::

      r = 1[C>0] ⊙ (A + F_∇x + M)                            (gate="sign", no_fx=True: the defaults)
      r = 1[C≠0] ⊙ (A + F_∇x + (F_x + M) ⊙ sigmoid(C))       (gate="sigmoid", no_fx=False: Eq. 13, the paper)

  ``G`` is the generic rule (:mod:`fxrel.rules.generic`) with the terms ``(|x|, |θ|)`` and ``(1, |θ|)``, no bias,
  zero-safe division;
* **"flat" convs** (§4.3) — ``Φ_in = C``. ``flat="paper"`` (default): none, every conv is full as in the paper;
  ``"official"``: the official ResNet code's choice, generalised to any architecture — 1×1 convs and convs whose
  output is an operand of a residual sum (Bottleneck conv1/conv3/downsample, BasicBlock conv2/downsample; DenseNet's
  bottleneck and transition convs, Inception's 1×1 branches); ``"all"``: every conv and linear layer flat (Table 5's
  "only C"; with every ablation switch this is absolute-influence LRP, §10.5);
* **linear** (§4.1, Alg. 1 lines 5–13) — ``C``; where the input is a flattened 4-D map, ``Φ_in = Δshift(C, M)``
  with ``M`` computed in the 4-D shape and masked to ``1[C≠0]`` before the max-normalisation;
* **input conv** (§4.4) — z^β with each image's min/max, no bias;
* **activations** — identity. The official ReLU z-rule ``Φ ⊙ 1[x>0]`` is the same wherever ``Φ`` comes from rules
  proportional to the layer input (C, A, z-rules: zero on dead units) — every net without pre-activation
  BatchNorm; in DenseNet the BatchNorm's shift puts ``Φ`` on units the ReLU before it zeroed, and the mask drops
  it (measured on a random dense block: Σ Φ = 6.58 at the input against 0.068 at every node above the stem ReLU).
  **BatchNorm** left unfolded — identity (a folded BatchNorm changes nothing: C and A are invariant to scaling a
  conv's output channels); **max pooling** — winner-take-all (the official z-rule wherever the window is not all
  zero); **residual sums, average pooling, centring** — RAP's absolute split ``Φ_a = |a| / Σ|·| · Φ``
  (``residual="absolute"``, default) or the official signed z-split ``Φ_a = a ⊙ sdiv(Φ, Σ·)`` (``"official"``, the
  official z-rule ∝ ``x`` at the poolings). Both conserve; the signed split amplifies where the operands nearly
  cancel, as for RAP (:mod:`fxrel.catalog.rap`) — measured on the trained demo ResNet (16 scenes, 36 image/class pairs):
  pointing game 0.14 with the signed split at the sums, 1.00 with the absolute one (energy pointing game 0.21 →
  0.70); on zoo-densenet, whose transitions average-pool a convolution's signed output, 0.28 with the signed split
  at the poolings, 0.97 with the absolute one (12 scenes, 29 pairs);
  **concatenation** — slicing (the official code raises; slicing conserves); **forks** — a sum (§4.5 Clone).

Ablations (Table 5, §4.2; conv layers): ``no_a``, ``no_fx`` (on by default), ``no_fdx``, ``no_m``, ``no_reg`` (drop
the gate: ``1[C≠0]`` on every term) and ``gradcam`` (the numerator ``F_x + M`` replaced by
``relu(mean_c(x ⊙ GAP(∇x_masked)))``). ``normalize`` divides the result by its per-sample maximum (§6, the official
heatmap before the channel sum). ``score="softmax_gaussian", gate="sigmoid", no_fx=False`` is the paper;
``flat="official", residual="official"`` on top of it the official code.

**Defaults that differ from the paper**, each found with the class discrimination (Disc) of the channel-summed Φ
at every conv node of the evaluation zoo (:mod:`fxrel.zoo`, 12 scenes, 29 image/class pairs; ``docs/fidelity.md``).
On zoo-vgg / resnet / bottleneck / densenet / inception / timm the paper's score, gate and ``F_x`` give Disc 0.65 /
0.94 / 0.88 / 0.90 / 0.89 / 0.82 (0.65 / 0.58 / 0.86 / 0.85 / 0.87 / 0.68 with the official flats and signed split,
the official code), the defaults 0.92 / 0.99 / 0.97 / 0.94 / 0.99 / 0.92, Grad-CAM 0.81 / 0.90 / 0.93 / 0.92 / 0.93 /
0.85:

* ``gate="sign"``: ``sigmoid(C)`` (Eq. 13) is meant to keep the class-agnostic terms off the background, but ``C``'s
  scale is that of Φ, whose sum is the tiny score gradient: at the top conv of zoo-bottleneck the median ``|C|`` is
  2.5e-5 and every entry has ``sigmoid(C)`` within 0.5 ± 0.025 (88–92 % of the entries at zoo-vgg's top two convs; the
  paper's setting with the official flats), so the gate passes half of every term everywhere. Its scale-free limit
  ``1[C>0]`` on every residual term (``A`` and ``F_∇x`` too) keeps the residual where the attribution is positive:
  ``gate="sigmoid"`` with the other defaults gives Disc 0.83 / 0.95 / 0.92 / 0.89 / 0.94 / 0.86, below Grad-CAM on
  zoo-bottleneck and zoo-densenet.
* ``no_fx=True``: ``F_x`` factorises the *activations*, high on every object whatever the class; with it the maps
  of two classes of one image correlate r = 0.11 on zoo-vgg (−0.02 without) and Disc is 0.01–0.09 lower on every
  zoo model (zoo-vgg 0.83).
* ``score="logit"``: ``ŷ_t``'s gaussian is flat at its peak, so it contrasts least with the classes whose logits are
  nearest ``y_t`` — in a scene, the other objects: mean ``∂ŷ_t/∂Y`` 0.030 for the target, −0.0024 for the other
  present classes and 0.0034 (absolute) for each absent one on zoo-vgg's two-object scenes. With ``y_t`` Disc rises
  on zoo-vgg / bottleneck / timm (0.88 → 0.92, 0.95 → 0.97, 0.86 → 0.92) and moves by ≤ 0.004 on the others.
* ``flat="paper"``: the official code's flat 1×1 and residual convs keep ``C`` alone; with the sign gate every full
  conv adds class-specific residual, and the flats cost Disc (0.94 → 0.97 on zoo-bottleneck, 0.92 → 0.94 on
  zoo-densenet, 0.97 → 0.99 on zoo-inception).

Differences from the official code: division is exactly zero-safe; the official ``safe_divide`` adds 1e-9 to every
denominator, which also shifts the max-normalisations of M and of the factorisation's gradient where their maxima are
1e-9–1e-8 (official M peaks at 0.942 instead of 1 at VGG-16's first linear layer; max|Δ|/max|R| against the official
code 4.8e-2 on VGG-16 and 3.3e-4 on ResNet-50, 8.7e-14 and 1.4e-14 with exact division swapped into it,
``docs/official_agreement.md``); the factorization's 2×2 system is solved in closed form.

On transformers AGF runs unchanged: its attribution and gradient streams cross attention with the weights constant
(CP-LRP, the structural default) in the attribution stream and the exact gradient in the gradient stream.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from fxrel.catalog.method import Method, StreamSpec, seed_gradient
from fxrel.catalog.registry import register
from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, after_last, kind, last, reads_input, where
from fxrel.rules.factorization import check_options, factorize, max_normalize
from fxrel.rules.generic import GenericRule, Group, Term, absolute, ones
from fxrel.rules.gradient import Gradient, Pass
from fxrel.rules.lrp import SumSplit, ZBox
from fxrel.rules.shift import total, uniform_shift

#: name of the gradient stream (a helper stream of the sweep)
GRADIENT = "gradient"
FLAT_MODES = ("official", "paper", "all")
#: what multiplies the residual: ``1[C>0]`` on every term, or the paper's ``sigmoid(C)`` on ``F_x + M`` (Eq. 13)
GATES = ("sign", "sigmoid")


# --- §2: the initial attribution ---------------------------------------------------------------------------------
def softmax_gaussian_gradient(output: Any, mask: Any) -> Any:
    """``∂ŷ_t/∂Y`` for logits ``Y`` ``[N, K]`` and the one-hot target ``mask`` (Alg. 1 lines 2–3), in closed form.

    With ``d = Y − y_t``, ``σ = |d_m| = max_k |d_k|``, ``u = d/σ``, ``g = exp(−u²/2)``, ``p = softmax(y_t g)`` and
    ``a = p_t (e_t − p)`` (the gradient of ``p_t`` with respect to the softmax's input), ``b = −a y_t g u / σ``::

        ∂ŷ_t/∂Y = e_t Σ_k a_k g_k + b − e_t Σ_k b_k − sign(d_m) (e_m − e_t) Σ_k b_k u_k

    (the last term is σ's dependence on ``Y``; ``σ = 0`` — all logits equal — is guarded and gives ``b = 0``)."""
    y_t = (output * mask).sum(1, keepdim=True)
    d = output - y_t
    spread = d.abs()
    sigma = spread.amax(1, keepdim=True)
    sigma = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    u = d / sigma
    g = torch.exp(-0.5 * u * u)
    p = torch.softmax(y_t * g, dim=1)
    p_t = (p * mask).sum(1, keepdim=True)
    a = p_t * (mask - p)
    b = -a * y_t * g * u / sigma
    widest = torch.zeros_like(d).scatter(1, spread.argmax(1, keepdim=True), 1.0)
    sign = torch.sign((d * widest).sum(1, keepdim=True))
    return (mask * ((a * g).sum(1, keepdim=True) - b.sum(1, keepdim=True)) + b
            - sign * (widest - mask) * (b * u).sum(1, keepdim=True))


#: the score both streams start from: ``y_t`` (its gradient ``e_t``) or the paper's softmax-gaussian ``ŷ_t``
SCORES = {"logit": seed_gradient, "softmax_gaussian": softmax_gaussian_gradient}


# --- §3: the building blocks -------------------------------------------------------------------------------------
#: Eq. 9 and Eq. 10: the generic rule with the terms (|x|, |θ|) and (1, |θ|), no bias, zero-safe division
INFLUENCE = GenericRule((Group((Term(absolute, torch.abs, "absw", zero_bias=True),)),), 0.0, "C=G(|x|,|θ|)")
AGNOSTIC = GenericRule((Group((Term(ones, torch.abs, "absw", zero_bias=True, param_sign=1),)),), 0.0, "A=G(1,|θ|)")


def channel_mean(t: Any) -> Any:
    """``mean_c t`` broadcast back over the channels."""
    return t.mean(1, keepdim=True).expand_as(t)


def interaction(x: Any, grad: Any, support: Any = None) -> Any:
    """Eq. 12: ``M = N_max(mean_c(x ⊙ ∇x)⁺)``, masked to ``support`` before the max-normalisation."""
    m = channel_mean(x * grad).clamp(min=0)
    if support is not None:
        m = m * support
    return max_normalize(m)


def delta_shift(c: Any, r: Any) -> Any:
    """Def. 2 / Eq. 14: ``C + r − (Σr / N_nz(C)) · 1[C≠0]`` — keeps ``Σ C``."""
    return uniform_shift(c + r, total(r), c)


# --- §4: rules ---------------------------------------------------------------------------------------------------
class AttributionAtHead(Rule):
    """The classifier layer (Eq. 8): ``Φ = x ⊙ Wᵀ ∂ŷ_t/∂Y`` — gradient × input of ``ŷ_t`` at its input."""

    kinds = frozenset({ops.CONV, ops.LINEAR})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return [ctx.inputs[0] * ctx.vjp(relevance)[0]]


class Influence(Rule):
    """A "flat" layer (§4.3): ``Φ_in = C`` only."""

    kinds = frozenset({ops.CONV, ops.LINEAR})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return INFLUENCE(ctx, relevance)


def _gradient_at_input(ctx: RuleContext) -> Any:
    """``∇x``: what the gradient stream sent to the node's input (it runs first in the sweep)."""
    sent = ctx.downstream.get(GRADIENT)
    if sent is None:
        raise RuleError(f"AGF's rule at node '{ctx.node.name}' needs the '{GRADIENT}' stream, which did not reach it")
    return sent[0]


@dataclasses.dataclass(frozen=True)
class Factorization:
    """The options of F̄ (:func:`fxrel.rules.factorization.factorize`)."""

    slope: float | None = 10.0
    ridge: float = 1.0
    background: str = "negative"

    def __call__(self, values: Any, guide: Any) -> Any:
        return factorize(values, guide, self.slope, self.ridge, self.background).clamp(min=0)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """Table 5's switches (all off: the full method)."""

    no_a: bool = False
    no_fx: bool = False
    no_fdx: bool = False
    no_m: bool = False
    no_reg: bool = False
    gradcam: bool = False


class AGFConv(Rule):
    """§4.2 (Eq. 9–14) for a convolution; see the module docstring."""

    kinds = frozenset({ops.CONV})

    def __init__(self, factorization: Factorization = Factorization(), ablation: Ablation = Ablation(),
                 gate: str = "sign") -> None:
        self.factorization = factorization
        self.ablation = ablation
        self.gate = gate

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        x, off = ctx.inputs[0], self.ablation
        (c,) = INFLUENCE(ctx, relevance)
        masked = None
        if off.gradcam or not off.no_fdx:
            (masked,) = ctx.vjp(ctx.upstream[GRADIENT] * (relevance != 0).to(x.dtype))
        guide = c.mean(1, keepdim=True)
        numerator: Any = 0
        if off.gradcam:
            numerator = channel_mean(x * masked.mean((2, 3), keepdim=True)).clamp(min=0)
        else:
            if not off.no_fx:
                numerator = numerator + self.factorization(x, guide)
            if not off.no_m:
                numerator = numerator + interaction(x, _gradient_at_input(ctx))
        residual: Any = 0
        if not isinstance(numerator, int):
            residual = numerator * torch.sigmoid(c) if self.gate == "sigmoid" and not off.no_reg else numerator
        if not off.no_fdx:
            residual = residual + self.factorization(masked, guide)
        if not off.no_a:
            residual = residual + AGNOSTIC(ctx, relevance)[0]
        if isinstance(residual, int):
            return [c]
        support = c > 0 if self.gate == "sign" and not off.no_reg else c != 0
        return [delta_shift(c, residual * support.to(c.dtype))]

    def __repr__(self) -> str:
        switches = [k for k, v in dataclasses.asdict(self.ablation).items() if v]
        return f"AGFConv({self.factorization}, gate={self.gate}{', ' + ', '.join(switches) if switches else ''})"


def flattened_map(node: fx.Node) -> torch.Size | None:
    """The 4-D shape a linear layer's input was flattened from (through shape ops), or ``None``."""
    source = node.args[0]
    while isinstance(source, fx.Node) and source.meta.get("fxrel_kind") == ops.SHAPE:
        source = source.args[0]
        shape = source.meta["tensor_meta"].shape if "tensor_meta" in source.meta else None
        if shape is not None and len(shape) == 4:
            return shape
    return None


class AGFLinear(Rule):
    """§4.1 (Alg. 1 lines 5–13) for a linear layer below the classifier."""

    kinds = frozenset({ops.LINEAR})

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        (c,) = INFLUENCE(ctx, relevance)
        shape = flattened_map(ctx.node)
        if shape is None:
            return [c]
        x = ctx.inputs[0]
        spatial = (-1, *shape[1:])
        m = interaction(x.reshape(spatial), _gradient_at_input(ctx).reshape(spatial),
                        (c != 0).to(c.dtype).reshape(spatial)).reshape_as(x)
        return [delta_shift(c, m)]


def _pointwise_or_residual(node: fx.Node) -> bool:
    """The official "flat" convs, for any architecture: 1×1 kernels, and convs whose output (through unfolded
    BatchNorms) is an operand of a residual sum."""
    if node.meta.get("fxrel_kind") != ops.CONV:
        return False
    if ops.conv_geometry(node).pointwise:
        return True
    frontier = [node]
    while frontier:
        users = [u for n in frontier for u in n.users]
        if any(u.meta.get("fxrel_kind") == ops.ADD for u in users):
            return True
        frontier = [u for u in users if u.meta.get("fxrel_kind") == ops.AFFINE]
    return False


def agf_composite(factorization: Factorization = Factorization(), ablation: Ablation = Ablation(),
                  flat: str = "paper", residual: str = "absolute", gate: str = "sign") -> Composite:
    """AGF's attribution-stream rule set (see the module docstring)."""
    if gate not in GATES:
        raise RuleError(f"gate must be one of {GATES}, got {gate!r}")
    if flat not in FLAT_MODES:
        raise RuleError(f"flat must be one of {FLAT_MODES}, got {flat!r}")
    if residual not in ("official", "absolute"):
        raise RuleError(f"residual must be 'official' or 'absolute', got {residual!r}")
    pairs: list = [(after_last(), Gradient()), (reads_input(ops.CONV), ZBox("image", "image", 0.0, ignore_bias=True)),
                   (last(), AttributionAtHead())]
    if flat == "all":
        pairs.append((kind(ops.CONV, ops.LINEAR), Influence()))
    elif flat == "official":
        pairs.append((where(_pointwise_or_residual), Influence()))
    pairs += [(kind(ops.CONV), AGFConv(factorization, ablation, gate)), (kind(ops.LINEAR), AGFLinear()),
              (kind(ops.ACTIVATION, ops.AFFINE), Pass()),
              (kind(*ops.SUM_KINDS), SumSplit(absolute=residual == "absolute"))]
    return Composite(pairs, f"agf[flat={flat}, residual={residual}, gate={gate}]")


def max_normalized(relevance: Any, value: Any) -> Any:
    """§6: ``Φ / max Φ`` per sample."""
    return max_normalize(relevance)


AGF_OUTPUT = ("signed, shaped like the input; Σ Φ = Σ X ⊙ ∂s/∂X at the classifier's input X (s = y_t, or ŷ_t with "
              "score='softmax_gaussian'), kept by every layer "
              "(Δ-shift) up to zero-denominator leaks; normalize=True: divided by the per-sample max")


@register("agf", "attribution guided factorization: gradient and attribution streams in one sweep, absolute and "
          "input-agnostic influence, guided factorization of activations and gradients, Δ-shift",
          "Gur, Ali, Wolf 2021 (AGF)", AGF_OUTPUT)
def _agf(slope: float | None = 10.0, ridge: float = 1.0, background: str = "negative", flat: str = "paper",
         residual: str = "absolute", score: str = "logit", gate: str = "sign",
         no_a: bool = False, no_fx: bool = True, no_fdx: bool = False, no_m: bool = False, no_reg: bool = False,
         gradcam: bool = False, normalize: bool = False) -> Method:
    check_options(slope, ridge, background)
    if score not in SCORES:
        raise RuleError(f"score must be one of {tuple(SCORES)}, got {score!r}")
    composite = agf_composite(Factorization(slope, ridge, background),
                              Ablation(no_a, no_fx, no_fdx, no_m, no_reg, gradcam), flat, residual, gate)
    start = SCORES[score]
    gradient = StreamSpec(GRADIENT, Composite([(lambda node, info: True, Gradient())], "gradient"), start, helper=True)
    return Method("agf", composite, start, max_normalized if normalize else None, (gradient,))
