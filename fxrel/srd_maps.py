"""SRD explanations at several layers in one sweep (``specs/srd.md`` §3 "Output resolutions").

Named resolutions, resolved on the captured graph:

* ``"input"`` — the image's PFVs (SRD-input);
* ``"low"`` — layer X, the encoder output where the initial sharing ratio enters (SRD-low; ResNet-50 at 224 px:
  ``layer4``, 7×7; the official VGG16 code: ``features.29``, 14×14);
* ``"high"`` — the last feature map that every path passes through with at least 1/8 of the input's height
  (SRD-high; ResNet-50 at 224 px: ``layer2``, 28×28; VGG16: ``features.22``);
* any node or module name.

Each map is the channel sum of the relevance at that layer, ``[N, H, W]`` — every PFV's share — optionally resized
to the input (``upsample="input"``, bilinear) for display.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fxrel.errors import InputError
from fxrel.explainer import Explainer, Target
from fxrel.graphs.analysis import feature_layer, feature_maps
from fxrel.imageops import resize_maps

RESOLUTIONS = ("input", "high", "low")


def resolve_layer(explainer: Explainer, x: torch.Tensor, name: str) -> str:
    """The canonical node name behind ``"input"``, ``"high"``, ``"low"`` or a node/module name (kept as given)."""
    canonical = explainer.canonical_graph(x)
    if name == "input":
        return next(n.name for n in canonical.graph.nodes if n.op == "placeholder")
    if name not in ("high", "low"):
        return name
    layer, _ = feature_layer(canonical, getattr(explainer.method, "layer", None))
    if name == "low":
        return layer.name
    order = list(canonical.graph.nodes)
    tall = [n for n in feature_maps(canonical) if order.index(n) <= order.index(layer)
            and n.meta["tensor_meta"].shape[2] * 8 >= x.shape[2]]
    if not tall:
        raise InputError(f"no feature map below layer X = '{layer.name}' has at least 1/8 of the input's height")
    return tall[-1].name


def srd_maps(model: nn.Module, x: torch.Tensor, target: Target = None, layers: Sequence[str] = RESOLUTIONS,
             upsample: str | None = None, explainer: Explainer | None = None, **params: Any) -> dict[str, torch.Tensor]:
    """SRD maps ``{layer: [N, H, W]}`` at ``layers`` from one sweep; ``params`` go to the ``srd`` rule set (pass a
    built ``explainer`` instead to reuse its cached graphs)."""
    if upsample not in (None, "input"):
        raise InputError(f"upsample must be None or 'input', got {upsample!r}")
    explainer = explainer or Explainer(model, "srd", **params)
    nodes = {label: resolve_layer(explainer, x, label) for label in layers}
    relevance = explainer.attribute(x, target, stops=list(dict.fromkeys(nodes.values()))).relevance
    maps = {label: relevance[node].sum(1) for label, node in nodes.items()}
    if upsample == "input":
        maps = {label: resize_maps(m, x.shape[2:]) for label, m in maps.items()}
    return maps
