"""Facts about a canonical graph that rules, methods and drivers read: named nodes, the nodes that separate the
model, spatial feature maps and the last of them (the CAM layer, RSP's and SRD's layer X), module outputs.

Every function takes a canonical ``fx.GraphModule`` (shape-propagated: ``tensor_meta`` on every node) and reads it
only.
"""
from __future__ import annotations

from torch import fx

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.text import candidate_list

__all__ = ["RESAMPLING_KINDS", "cut_nodes", "feature_maps", "find_node", "is_spatial", "last_feature_map",
           "module_outputs", "node_shape"]

#: kinds that only resample, reshape or pad a feature map: never a model's "last feature map"
RESAMPLING_KINDS = frozenset({ops.MAXPOOL, ops.AVGPOOL, ops.SHAPE, ops.PAD})


def find_node(canonical: fx.GraphModule, name: str) -> fx.Node:
    """The canonical node called ``name``, or, for a module name, the module's output (the last node produced
    inside it); ``RuleError`` when there is neither."""
    nodes = {n.name: n for n in canonical.graph.nodes}
    if name in nodes:
        return nodes[name]
    inside = [n for n in canonical.graph.nodes if n.op == "call_function"
              and (n.meta.get("fxrel_module", "") + ".").startswith(name + ".")]
    if inside:
        return inside[-1]
    raise RuleError(f"no node or module named '{name}' in the canonical graph")


def cut_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that every path from the inputs to the output passes through, in order (a sequential model's every
    node; a residual network's block outputs, not the nodes inside a block): where a conserving method carries its
    whole total, and where a model splits into a feature extractor and a classifier. A node is one unless an edge
    jumps over it in the graph's topological order."""
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
    index = {n: i for i, n in enumerate(nodes)}
    jumps = [0] * (len(nodes) + 1)
    for node in nodes[1:]:
        for arg in ops.tensor_inputs(node) if node.op == "call_function" else []:
            if index[node] - index[arg] > 1:  # the edge jumps over the nodes strictly between its ends
                jumps[index[arg] + 1] += 1
                jumps[index[node]] -= 1
    cuts, open_edges = [], 0
    for i, node in enumerate(nodes):
        open_edges += jumps[i]
        if open_edges == 0:
            cuts.append(node)
    return cuts


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """A node's output shape from its ``tensor_meta`` (``None`` for non-tensor nodes)."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def is_spatial(node: fx.Node) -> bool:
    """Whether a node outputs a 4-D feature map with more than one position."""
    shape = node_shape(node)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def feature_maps(gm: fx.GraphModule) -> list[fx.Node]:
    """The spatial feature maps that separate the model (every later node depends on the input through them), in
    forward order."""
    return [n for n in cut_nodes(gm) if n.op == "call_function" and is_spatial(n)]


def last_feature_map(gm: fx.GraphModule, separating: bool = False) -> fx.Node:
    """The last spatial feature map before the model collapses the spatial dims.

    Walk the graph in order to the first node on the main path whose output is not spatial (global pooling,
    flatten, linear …; a squeeze-excitation gate's pooling is a side branch and is skipped); the answer is the last
    node before it with a spatial output that is not a pooling/reshaping/padding node (ResNet: ``layer4``'s final
    ReLU; VGG: the last ReLU before the pooling of ``features``). ``separating=True`` takes only the nodes every
    later node depends on (:func:`feature_maps`: RSP's and SRD's layer X). ``RuleError`` when there is none.
    """
    cuts = set(cut_nodes(gm))
    chosen = collapse = None
    for node in (n for n in gm.graph.nodes if n.op == "call_function"):
        if not is_spatial(node):
            if node in cuts:
                collapse = node
                break
            continue
        if node.meta.get("fxrel_kind") not in RESAMPLING_KINDS and (not separating or node in cuts):
            chosen = node
    if chosen is None:
        where = (f"before node '{collapse.name}' (module '{collapse.meta.get('fxrel_module', '')}') collapses the "
                 "spatial dims" if collapse is not None else "")
        raise RuleError(f"found no spatial feature map {where}; candidates: {candidate_list(module_outputs(gm))}")
    return chosen


def module_outputs(gm: fx.GraphModule, rank: int = 4) -> list[str]:
    """Module names whose output (their last canonical node) has ``rank`` dims, in forward order, outer modules
    first: the module names a driver accepts for a layer."""
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        module = node.meta.get("fxrel_module", "")
        if node.op == "call_function" and module:
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # a module stands for the last node produced inside it
                last[".".join(parts[:i])] = node
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    names = [name for name, node in last.items() if len(node_shape(node) or ()) == rank]
    return sorted(names, key=lambda name: (order[last[name]], name.count(".")))


def _module_names(nodes: list[fx.Node]) -> str:
    return candidate_list(list(dict.fromkeys(n.meta.get("fxrel_module") or n.name for n in nodes)))


def _spatial_named(gm: fx.GraphModule, layer: str) -> fx.Node:
    try:
        node = find_node(gm, layer)
    except RuleError as err:
        raise RuleError(f"no node or module named '{layer}'; feature maps: {_module_names(feature_maps(gm))}") from err
    if not is_spatial(node):
        raise RuleError(f"layer '{layer}' outputs shape {node_shape(node)}; layer X must be a spatial feature map "
                        f"[N, C, H, W] (feature maps: {_module_names(feature_maps(gm))})")
    return node


def nodes_above(gm: fx.GraphModule, layer: fx.Node) -> frozenset[str]:
    """The names of the nodes computed from ``layer`` (the classifier side); ``RuleError`` if any of them also
    reads a node ``layer`` does not feed, or if the model output does not depend on it."""
    above: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(a is layer or a in above for a in ops.tensor_inputs(node)):
            above.add(node)
    for node in above:
        foreign = [a.name for a in ops.tensor_inputs(node) if a is not layer and a not in above]
        if foreign:
            raise RuleError(f"layer X = '{layer.name}' does not separate the features from the classifier: node "
                            f"'{node.name}' above it also reads {foreign}; give layer= a feature map every later layer "
                            f"depends on (feature maps: {_module_names(feature_maps(gm))})")
    logits = gm.graph.find_nodes(op="output")[0].args[0]
    if logits not in above:
        raise RuleError(f"the model output does not depend on layer X = '{layer.name}'")
    return frozenset(n.name for n in above)


def feature_layer(gm: fx.GraphModule, layer: str | None = None) -> tuple[fx.Node, frozenset[str]]:
    """Layer X of the methods that enter there (RSP, SRD) — ``None``: the last separating spatial feature map
    (:func:`last_feature_map` with ``separating=True``), else the named node or module — and the names of the nodes
    above it (:func:`nodes_above`)."""
    if layer is not None:
        node = _spatial_named(gm, layer)
    else:
        try:
            node = last_feature_map(gm, separating=True)
        except RuleError as err:
            raise RuleError(f"layer X is the last spatial feature map before the classifier, and this model has "
                            f"none: {err}; methods entering at layer X (RSP, SRD) need a CNN") from None
    return node, nodes_above(gm, node)

