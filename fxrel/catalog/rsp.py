"""RSP and c*RSP: relative sectional propagation (Nam, Choi, Lee, AAAI 2021; ``specs/rsp.md``) as one relevance
graph.

The sweep starts at the model output, as every method's does (targets and seed masks as usual), but the layers
above X are not decomposed: helper streams carry the gradients (RSP) or excitation signals (c*RSP) down to X, where
the relative map (:mod:`fxrel.catalog.rgam`) becomes the initial relevance of the sectional stream
(:mod:`fxrel.catalog.sectional`), which runs from X to the input. Relevance at the stops — and ``stops=["*"]`` audits —
exist only from X down.

Layer X: ``layer=None`` picks the last spatial feature map before the model collapses the spatial dims, by the rule
of :func:`fxrel.graphs.analysis.last_feature_map`, among the nodes that separate the model (VGG: the last ReLU of
``features``; ResNet: ``layer4``'s output; DenseNet: the ReLU after ``norm5``; Inception: the last mixed block —
at inputs so small that the last stage's output is 1×1, the previous stage's). ``layer="name"`` takes a node or module
name; every layer above X must depend on the input through X only.

Transformers: layer X must be a CNN's last feature map; on a vision transformer the last spatial map is the patch
embedding, with all the attention above it, and RSP raises a ``RuleError`` saying so
(:func:`fxrel.graphs.analysis.feature_layer`). A hybrid whose last 4-D map follows its attention (MobileViT) runs.
"""
from __future__ import annotations

from fxrel.catalog.method import EnteringMethod, Method
from fxrel.catalog.registry import register
from fxrel.catalog.rgam import ContrastiveExcitationMap, GradientMap
from fxrel.catalog.sectional import sectional_composite

RSP_OUTPUT = ("signed, shaped like the input; paper/official_relative: Σ R = 1 at layer X (positive part 2, negative "
              "−1), kept by every layer below except at 1×1 convolutions' dead positions")


@register("rsp", "relative sectional propagation: relative gradient activation map against the hostile classes "
          "at the last feature layer, sectional propagation with uniform shifting below it",
          "Nam et al. 2021 (RSP)", RSP_OUTPUT)
def _rsp(rgam_mode: str = "paper", hostile: str = "predicted", layer: str | None = None) -> Method:
    return EnteringMethod("rsp", sectional_composite(), GradientMap(rgam_mode, hostile), layer=layer)


@register("crsp", "c*RSP: RSP from contrastive excitation backprop at the last feature layer (all other classes "
          "hostile)", "Nam et al. 2021 (c*RSP)", RSP_OUTPUT)
def _crsp(rgam_mode: str = "paper", layer: str | None = None) -> Method:
    return EnteringMethod("crsp", sectional_composite(), ContrastiveExcitationMap(rgam_mode), layer=layer)
