"""The relative map at RSP's layer X: the initial relevance of the sectional propagation (``specs/rsp.md`` §2).

Both maps are computed inside the relevance graph. Helper streams bring what they need down to X — every class's
gradient (the class-batched gradient of :mod:`fxrel.rules.batched`) or the two excitation-backprop signals — and
stop there; the map is the sectional stream's entry seed at X (see :mod:`fxrel.graphs.builder`). With the
activation ``A`` at X, ``α^c = mean_ij ∂y_c/∂A`` and the hostile classes ``H`` (``n = |H|``):

1. per-class map (Eq. 1): ``G^c = λ_c ReLU(A ⊙ α^c)`` with ``λ_c`` scaling the maximum to 1 (``paper``), or
   ``A ⊙ α^c / (max + 10⁻⁹)`` without the ReLU (the official code);
2. comparative map (Eq. 1): ``F = n G^t − Σ_{q∈H} G^q``, and ``F = G^t`` when ``H = ∅``;
3. purging (Eq. 2): units whose sign differs from their location's channel sum are set to 0;
4. sections: the positive part rescaled to sum 2, the negative part to sum −1, so ``Σ R_X = 1``.

Modes (``rgam_mode``): ``paper`` (1–4), ``paper_literal`` (step 4 as written: ``R_X = 2 F'⁺ + F'⁻``),
``official_relative`` (``relative_GAM`` of the official code: step 1 without ReLU, no unit purge, and step 4 on the
channel sum, spread evenly over the channels) and ``official_single`` (``A ⊙ α^t / (max + 10⁻⁹)`` alone: the path the
official ``main.py`` runs). Hostile classes (``hostile``): ``predicted`` — the other classes the model predicts,
i.e. with a positive score (σ(y_c) > ½, the multi-label decision of the paper's VOC/COCO classifiers) — or
``all`` other classes. c*RSP replaces steps 1–2 by contrastive excitation backprop evaluated at X,
``F = M_t − M_dual`` (no channel sum, no ReLU), then applies steps 3–4 in the same mode.

Cost: the relative gradient map needs every class's gradient at X — one class-batched gradient sweep of the layers
above X with ``K·N`` rows (``K`` classes), holding ``K`` copies of X's gradient. ``official_single`` needs only the
target's; c*RSP two excitation sweeps.
"""
from __future__ import annotations

from typing import Any, Collection

import torch
from torch import fx

from fxrel.catalog.contrastive import excitation_composite, excitation_dual_composite
from fxrel.catalog.method import seed_gradient
from fxrel.errors import RuleError
from fxrel.graphs.builder import Stream
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.batched import Repeated
from fxrel.rules.composite import Composite, where
from fxrel.rules.generic import divide, dtype_of, stabilizer_for
from fxrel.rules.gradient import Gradient
from fxrel.rules.shift import total

MODES = ("paper", "paper_literal", "official_relative", "official_single")
HOSTILE = ("predicted", "all")
#: the official code's guard in its max- and sum-normalisations (raised to ``finfo(dtype).tiny`` where it would
#: underflow, float16: :func:`fxrel.rules.generic.stabilizer_for`)
GUARD = 1e-9


class Stop(Rule):
    """A helper stream ends here: it sends nothing further down."""

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        return []


def _helper(name: str, composite: Composite, graph: fx.GraphModule, above: Collection[str], seed: Any) -> Stream:
    """A helper stream running ``composite`` on the layers above X and stopping at X."""
    plan = composite.with_rules([(where(lambda node: node.name not in above), Stop())]).plan(graph)
    return Stream(name, plan, seed, helper=True)


# --- steps 3-4 ---------------------------------------------------------------------------------------------------
def purge(f: Any) -> Any:
    """Eq. 2: keep the units whose sign is their location's channel-sum sign."""
    return f * (torch.sign(f) == torch.sign(f.sum(1, keepdim=True))).to(f.dtype)


def sections(f: Any) -> Any:
    """Step 4: the positive section rescaled to sum 2, the negative one to sum −1 (an empty section stays 0)."""
    flat = f.flatten(1)
    pos, neg = flat.clamp(min=0), flat.clamp(max=0)
    return (2 * divide(pos, total(pos), 0.0) + divide(neg, -total(neg), 0.0)).view_as(f)


def relative_gam(f: Any, dtype: torch.dtype | None = None) -> Any:
    """Steps 3–4 as the official ``relative_GAM``: normalise the signed parts, sum over channels, rescale the spatial
    map to +2/−1 and spread it evenly over the channels (every conflicting unit is gone by construction).
    ``dtype``: the maps' dtype (default ``f``'s where known), which :data:`GUARD` must not underflow in."""
    guard = stabilizer_for(GUARD, dtype or dtype_of(f))
    flat = f.flatten(1)
    pos, neg = flat.clamp(min=0), flat.clamp(max=0)
    pos = pos / (total(pos) + guard)
    neg = divide(neg, neg.amin(1, keepdim=True), 0.0)
    neg = neg / (total(neg) + guard) * total(pos)
    spatial = (pos - neg).view_as(f).sum(1, keepdim=True)
    s = spatial.flatten(1)
    up, down = s * (s > 0).to(s.dtype), s * (s <= 0).to(s.dtype)
    m = 2 * up / (total(up) + guard) - down / (total(down) + guard)
    return (m.view_as(spatial) / f.size(1)).expand_as(f)


def relative_relevance(f: Any, mode: str, dtype: torch.dtype | None = None) -> Any:
    """Steps 3–4 of ``mode`` on the comparative map ``F`` (``dtype``: see :func:`relative_gam`)."""
    if mode == "paper":
        return sections(purge(f))
    if mode == "paper_literal":
        purged = purge(f)
        return 2 * purged.clamp(min=0) + purged.clamp(max=0)
    return relative_gam(f, dtype)


def _check_mode(mode: str, modes: Collection[str]) -> None:
    if mode not in modes:
        raise RuleError(f"unknown rgam_mode {mode!r}; use one of {', '.join(modes)}")


# --- the relative gradient activation map ------------------------------------------------------------------------
def _every_class(output: Any, mask: Any) -> Any:
    """One one-hot seed per class and image, class-major: row ``k·N + n`` is ``e_k``."""
    return torch.diag_embed(torch.ones_like(mask[0])).repeat_interleave(mask.size(0), 0)


def class_gradients(name: str, graph: fx.GraphModule, above: Collection[str], every_class: bool) -> Stream:
    """A helper stream bringing the gradient of the target score — or of every class score, class-batched (rows
    ``k·N + n``) — down to layer X."""
    copies = graph.graph.find_nodes(op="output")[0].args[0].meta["tensor_meta"].shape[-1] if every_class else 1
    composite = Composite([(where(lambda node: True), Repeated(Gradient(), copies))])
    return _helper(name, composite, graph, above, _every_class if every_class else seed_gradient)


def _weighted(weights: Any, maps: Any) -> Any:
    """``Σ_c w[n, c] · maps[c, n]`` for per-class maps ``[K, N, C, H, W]``."""
    return (weights.t()[..., None, None, None] * maps).sum(0)


class GradientMap:
    """RSP's relative gradient activation map (Eq. 1–2, steps 3–4 of ``mode``) as the entry seed at X."""

    stream = "rsp_gradient"

    def __init__(self, mode: str = "paper", hostile: str = "predicted") -> None:
        _check_mode(mode, MODES)
        if hostile not in HOSTILE:
            raise RuleError(f"unknown hostile {hostile!r}; use one of {', '.join(HOSTILE)}")
        self.mode, self.hostile = mode, hostile

    def helpers(self, graph: fx.GraphModule, above: Collection[str]) -> list[Stream]:
        """The gradient at X: the target's (``official_single``) or every class's, class-batched."""
        return [class_gradients(self.stream, graph, above, every_class=self.mode != "official_single")]

    def __call__(self, logits: Any, mask: Any, activation: Any, arrived: dict[str, Any]) -> Any:
        gradient = arrived[self.stream]
        dtype = dtype_of(activation)
        guard = stabilizer_for(GUARD, dtype)
        if self.mode == "official_single":
            cam = (activation * gradient.mean((2, 3), keepdim=True)).flatten(1)
            return (cam / (cam.amax(1, keepdim=True) + guard)).view_as(activation)
        alpha = gradient.mean((2, 3)).view(mask.size(1), mask.size(0), -1)
        maps = activation.unsqueeze(0) * alpha[..., None, None]                       # A ⊙ α^c, [K, N, C, H, W]
        if self.mode == "official_relative":
            maps = maps / (maps.flatten(2).amax(2)[..., None, None, None] + guard)
        else:
            maps = maps.clamp(min=0)
            maps = divide(maps, maps.flatten(2).amax(2)[..., None, None, None], 0.0)  # λ_c: maximum 1
        hostile = (mask == 0) if self.hostile == "all" else (mask == 0) & (logits > 0)
        hostile = hostile.to(maps.dtype)
        n = hostile.sum(1)[:, None, None, None]
        target = _weighted(mask, maps)
        f = torch.where(n > 0, n * target - _weighted(hostile, maps), target)
        return relative_relevance(f, self.mode, dtype)

    def __repr__(self) -> str:
        return f"GradientMap(mode={self.mode!r}, hostile={self.hostile!r})"


class ContrastiveExcitationMap:
    """c*RSP's relative map: contrastive excitation backprop at X, ``F = M_t − M_dual``, then steps 3–4."""

    streams = ("excitation", "excitation_dual")

    def __init__(self, mode: str = "paper") -> None:
        _check_mode(mode, MODES[:3])
        self.mode = mode

    def helpers(self, graph: fx.GraphModule, above: Collection[str]) -> list[Stream]:
        """Excitation backprop for the target, and through the classifier with negated weights."""
        return [_helper(name, composite, graph, above, seed_gradient)
                for name, composite in zip(self.streams, (excitation_composite(), excitation_dual_composite()))]

    def __call__(self, logits: Any, mask: Any, activation: Any, arrived: dict[str, Any]) -> Any:
        target, dual = self.streams
        return relative_relevance(arrived[target] - arrived[dual], self.mode, dtype_of(activation))

    def __repr__(self) -> str:
        return f"ContrastiveExcitationMap(mode={self.mode!r})"
