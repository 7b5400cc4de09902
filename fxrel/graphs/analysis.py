"""Facts about a canonical graph that rules, methods and drivers read: named nodes, the nodes that separate the
model, spatial feature maps and the last of them (the CAM layer, RSP's and SRD's layer X), module outputs.

Every function takes a canonical ``fx.GraphModule`` (shape-propagated: ``tensor_meta`` on every node) and reads it
only.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.text import candidate_list

__all__ = ["RESAMPLING_KINDS", "TokenGrid", "cut_nodes", "feature_maps", "find_node", "is_spatial",
           "last_feature_map", "last_token_map", "module_outputs", "node_shape", "token_grid", "token_layout"]

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
    (:func:`last_feature_map` with ``separating=True``; refused, with the reason, when attention follows it: a
    vision transformer's patch embedding), else the named node or module — and the names of the nodes above it
    (:func:`nodes_above`)."""
    if layer is not None:
        node = _spatial_named(gm, layer)
    else:
        try:
            node = last_feature_map(gm, separating=True)
        except RuleError as err:
            raise RuleError(f"layer X is the last spatial feature map before the classifier, and this model has "
                            f"none: {err}; methods entering at layer X (RSP, SRD) need a CNN") from None
        kinds = {n.name: n.meta.get("fxrel_kind") for n in gm.graph.nodes}
        attends = [name for name in nodes_above(gm, node) if kinds[name] == ops.ATTEND]
        if attends and token_grid(gm) is not None:   # a vision transformer's patch embedding, attention above it
            raise RuleError(
                f"layer X would be '{node.name}' (module '{node.meta.get('fxrel_module', '')}'), the last spatial "
                f"feature map, but {len(attends)} attention layers follow it: this is a transformer's patch "
                "embedding, not a CNN's last feature map. RSP and SRD decompose a CNN's classifier above layer X "
                "(their papers' setting); give layer= a later 4-D map of a hybrid, or explain transformers with "
                "attn_lrp, lrp_epsilon or grad_cam (which reads the token grid)")
    return node, nodes_above(gm, node)



# -- token grids (vision transformers) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenGrid:
    """Where a transformer's patch tokens come from: the ``height × width`` grid of the patch embedding, and the
    constant tokens (class, distillation, register) before them at a token node (``prefix``)."""

    height: int
    width: int
    channels: int      #: the patch embedding's width
    prefix: int = 0

    @property
    def tokens(self) -> int:
        return self.height * self.width


#: at most this many constant tokens precede the patch tokens (class, distillation and register tokens)
MAX_PREFIX = 16


def token_grid(gm: fx.GraphModule) -> TokenGrid | None:
    """The patch grid of a transformer: the first reshape of a spatial map ``[N, C, h, w]`` into ``[N, C, h·w]``
    that is then transposed into tokens ``[N, h·w, C]`` (ViT's patch embedding, ``flatten(2).transpose(1, 2)``;
    attention pooling's ``view(n, c, h·w)`` is not transposed); ``None`` for a model without one."""
    def transposed(node: fx.Node) -> bool:
        return any(u.target is ops.aten.transpose.int and sorted(d % 3 for d in u.args[1:3]) == [1, 2]
                   or u.target is ops.aten.permute.default and [d % 3 for d in u.args[1]] == [0, 2, 1]
                   for u in node.users)

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ops.aten.reshape.default and is_spatial(node.args[0]):
            source, out = node_shape(node.args[0]), node_shape(node)
            if (out is not None and len(out) == 3 and out[:2] == source[:2] and out[2] == source[2] * source[3]
                    and transposed(node)):
                return TokenGrid(source[2], source[3], source[1])
    return None


def token_layout(node: fx.Node, grid: TokenGrid) -> TokenGrid | None:
    """``grid`` with the prefix of ``node`` when its output is tokens of the embedding's width,
    ``[N, prefix + h·w, C]``, else ``None``."""
    shape = node_shape(node)
    if (shape is None or len(shape) != 3 or shape[2] != grid.channels
            or not 0 <= shape[1] - grid.tokens <= MAX_PREFIX):
        return None
    return TokenGrid(grid.height, grid.width, grid.channels, shape[1] - grid.tokens)


def last_token_map(gm: fx.GraphModule) -> tuple[fx.Node, TokenGrid] | None:
    """The CAM layer of a vision transformer: the tokens that enter the last attention (its values' source before
    their projection: the last block's first normalisation, where pytorch-grad-cam's documentation puts ViT CAMs;
    CaiT's and XCiT's last class-attention block's), with their grid;
    ``None`` without a token grid or attention after it."""
    grid = token_grid(gm)
    attends = [n for n in gm.graph.nodes if n.meta.get("fxrel_kind") == ops.ATTEND]
    if grid is None or not attends:
        return None
    node = ops.tensor_inputs(attends[-1])[0]
    while node.op == "call_function":
        layout = token_layout(node, grid)
        if layout is not None and node.meta.get("fxrel_kind") != ops.LINEAR:   # past the value projection
            return node, layout
        node = ops.tensor_inputs(node)[0]
    return None
