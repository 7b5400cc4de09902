"""RSP and c*RSP: relative sectional propagation (Nam, Choi, Lee, AAAI 2021; ``specs/rsp.md``) as one relevance
graph.

The sweep starts at the model output, as every method's does (targets and seed masks as usual), but the layers
above X are not decomposed: helper streams carry the gradients (RSP) or excitation signals (c*RSP) down to X, where
the relative map (:mod:`fxrel.rules.rgam`) becomes the initial relevance of the sectional stream
(:mod:`fxrel.rules.sectional`), which runs from X to the input. Relevance at the stops — and ``stops=["*"]`` audits —
exist only from X down.

Layer X: ``layer=None`` picks the last spatial feature map before the model collapses the spatial dims, by the rule
of :func:`fxrel.graphs.analysis.last_feature_map`, among the nodes that separate the model (VGG: the last ReLU of
``features``; ResNet: ``layer4``'s output; DenseNet: the ReLU after ``norm5``; Inception: the last mixed block —
at inputs so small that the last stage's output is 1×1, the previous stage's). ``layer="name"`` takes a node or module
name; every layer above X must depend on the input through X only.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import fx

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.graphs.analysis import feature_maps, find_node, is_spatial, last_feature_map
from fxrel.graphs.builder import Stream
from fxrel.rules.base import Rule
from fxrel.rules.composite import Matcher
from fxrel.rules.methods import Method, register
from fxrel.rules.rgam import ContrastiveExcitationMap, GradientMap
from fxrel.rules.sectional import sectional_composite
from fxrel.text import candidate_list


def _names(nodes: list[fx.Node]) -> str:
    return candidate_list(list(dict.fromkeys(n.meta.get("fxrel_module") or n.name for n in nodes)))


def _named(graph: fx.GraphModule, layer: str) -> fx.Node:
    try:
        node = find_node(graph, layer)
    except RuleError as err:
        raise RuleError(f"no node or module named '{layer}'; feature maps: {_names(feature_maps(graph))}") from err
    if not is_spatial(node):
        raise RuleError(f"layer '{layer}' outputs shape {tuple(node.meta['tensor_meta'].shape)}; RSP starts at a "
                        f"spatial feature map [N, C, H, W] (feature maps: {_names(feature_maps(graph))})")
    return node


def _above(graph: fx.GraphModule, layer: fx.Node) -> frozenset[str]:
    """The nodes computed from X (the classifier side); an error if any of them also reads a node X does not feed."""
    above: set[fx.Node] = set()
    for node in graph.graph.nodes:
        if node.op == "call_function" and any(a is layer or a in above for a in ops.tensor_inputs(node)):
            above.add(node)
    for node in above:
        foreign = [a.name for a in ops.tensor_inputs(node) if a is not layer and a not in above]
        if foreign:
            raise RuleError(f"layer X = '{layer.name}' does not separate the features from the classifier: node "
                            f"'{node.name}' above it also reads {foreign}; give layer= a feature map every later layer "
                            f"depends on (feature maps: {_names(feature_maps(graph))})")
    logits = graph.graph.find_nodes(op="output")[0].args[0]
    if logits not in above:
        raise RuleError(f"the model output does not depend on layer X = '{layer.name}'")
    return frozenset(n.name for n in above)


def feature_layer(graph: fx.GraphModule, layer: str | None = None) -> tuple[fx.Node, frozenset[str]]:
    """Layer X (``None``: the last spatial feature map) and the names of the nodes above it."""
    if layer is not None:
        node = _named(graph, layer)
    else:
        try:
            node = last_feature_map(graph, separating=True)
        except RuleError as err:
            raise RuleError(f"layer X is the last spatial feature map before the classifier, and this model has "
                            f"none: {err}; RSP and SRD need a CNN") from None
    return node, _above(graph, node)


@dataclasses.dataclass
class SectionalMethod(Method):
    """A method whose relevance enters at layer X from a relative map (``seed``: a :class:`GradientMap` or
    :class:`ContrastiveExcitationMap`, computed at X from the helper streams it adds) and is propagated to the
    input by the sectional rules."""

    layer: str | None = None

    def streams(self, graph: fx.GraphModule, overrides: Sequence[tuple[Matcher, Rule]] = ()) -> list[Stream]:
        layer, above = feature_layer(graph, self.layer)
        main = dataclasses.replace(super().streams(graph, overrides)[0], entry=layer.name)
        return [main, *self.seed.helpers(graph, above)]


RSP_OUTPUT = ("signed, shaped like the input; paper/official_relative: Σ R = 1 at layer X (positive part 2, negative "
              "−1), kept by every layer below except at 1×1 convolutions' dead positions")


@register("rsp", "relative sectional propagation: relative gradient activation map against the hostile classes "
          "at the last feature layer, sectional propagation with uniform shifting below it", "Nam et al. 2021 (RSP)",
          RSP_OUTPUT, rgam_mode="paper", hostile="predicted", layer=None)
def _rsp(rgam_mode: str, hostile: str, layer: str | None) -> Method:
    return SectionalMethod("rsp", sectional_composite(), GradientMap(rgam_mode, hostile), layer=layer)


@register("crsp", "c*RSP: RSP from contrastive excitation backprop at the last feature layer (all other classes "
          "hostile)", "Nam et al. 2021 (c*RSP)", RSP_OUTPUT, rgam_mode="paper", layer=None)
def _crsp(rgam_mode: str, layer: str | None) -> Method:
    return SectionalMethod("crsp", sectional_composite(), ContrastiveExcitationMap(rgam_mode), layer=layer)
