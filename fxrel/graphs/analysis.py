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
