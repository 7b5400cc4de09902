"""Export of relevance graphs for inspection: networkx graphs, Graphviz DOT, and shape annotation.

Every node of a relevance graph carries ``fxrel_role`` (forward / seed / relevance / recomputed), ``fxrel_forward`` (the
canonical forward node it serves), ``fxrel_rule`` and ``fxrel_stream``; these exports keep that metadata.
"""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxrel.graphs.builder import RelevanceGraph

_ROLE_COLOURS = {"forward": "#dddddd", "seed": "#ffd27f", "relevance": "#9ecae1"}


def annotate_shapes(graph: RelevanceGraph) -> None:
    """Record every node's output shape in ``node.meta['fxrel_shape']`` (fake tensors: no real compute)."""
    module = graph.module
    if all("fxrel_shape" in n.meta for n in module.graph.nodes if n.op != "output"):
        return
    start_shape = next(n for n in graph.canonical.graph.nodes if n.name == graph.start).meta["tensor_meta"].shape
    inputs = [n.meta["tensor_meta"] for n in graph.canonical.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(torch.empty(m.shape, dtype=m.dtype)) for m in inputs]
    fake.append(mode.from_tensor(torch.empty(start_shape, dtype=inputs[0].dtype)))
    FakeTensorProp(module, mode).propagate(*fake)
    for node in module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta["fxrel_shape"] = tuple(val.shape)
        elif isinstance(val, (tuple, list)):  # multi-output ops (max-pool with indices)
            node.meta["fxrel_shape"] = tuple(tuple(v.shape) for v in val if isinstance(v, torch.Tensor))


def _target_name(node: fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def to_networkx(graph: RelevanceGraph) -> nx.DiGraph:
    """The relevance program as a ``networkx.DiGraph``: one vertex per fx node with attributes ``op``, ``target``,
    ``role``, ``forward_node``, ``rule``, ``stream`` and ``shape``; an edge per data dependency."""
    annotate_shapes(graph)
    g = nx.DiGraph(name="relevance graph", start=graph.start, stops=tuple(graph.stops))
    for node in graph.module.graph.nodes:
        g.add_node(node.name, op=node.op, target=_target_name(node), role=node.meta.get("fxrel_role", "output"),
                   forward_node=node.meta.get("fxrel_forward"), rule=node.meta.get("fxrel_rule"),
                   stream=node.meta.get("fxrel_stream"), shape=node.meta.get("fxrel_shape"))
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name)
    return g


def _quote(text: Any) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: RelevanceGraph, include_params: bool = False) -> str:
    """Graphviz DOT text of the relevance program; forward nodes grey, seed orange, relevance blue, one cluster
    per forward node's rule application. Parameter (``get_attr``) nodes are left out unless ``include_params``."""
    g = to_networkx(graph)
    keep = [n for n, d in g.nodes(data=True) if include_params or d["op"] != "get_attr"]
    lines = ["digraph relevance {", "  rankdir=TB;", '  node [shape=box, style=filled, fontname="Helvetica"];']
    clusters: dict[str, list[str]] = {}
    for name in keep:
        d = g.nodes[name]
        if d["role"] == "relevance" and d["forward_node"]:
            clusters.setdefault(f'{d["forward_node"]} · {d["rule"]}', []).append(name)
    clustered = {n for members in clusters.values() for n in members}
    for i, (label, members) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{i} {{ label={_quote(label)}; style=dashed;")
        lines += [f"    {_node_line(n, g.nodes[n])}" for n in members]
        lines.append("  }")
    lines += [f"  {_node_line(n, g.nodes[n])}" for n in keep if n not in clustered]
    lines += [f"  {_quote(a)} -> {_quote(b)};" for a, b in g.edges() if a in keep and b in keep]
    lines.append("}")
    return "\n".join(lines)


def _node_line(name: str, d: dict) -> str:
    shape = _shape_text(d.get("shape"))
    label = f"{name}\\n{d['target']}" + (f"\\n[{shape}]" if shape else "")
    colour = _ROLE_COLOURS.get(d["role"], "#ffffff")
    return f"{_quote(name)} [label={_quote(label)}, fillcolor={_quote(colour)}];"


def _shape_text(shape: Any) -> str:
    if not shape:
        return ""
    if isinstance(shape[0], tuple):
        return ", ".join("×".join(map(str, s)) for s in shape)
    return "×".join(map(str, shape))


def to_json(graph: RelevanceGraph) -> dict:
    """The relevance program as JSON-ready node-link data: ``{"start", "stops", "nodes": [...], "edges": [...]}``
    with each node's ``name``, ``op``, ``target``, ``role``, ``forward_node``, ``rule``, ``stream`` and ``shape``."""
    g = to_networkx(graph)
    nodes = [{"name": n, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}}
             for n, d in g.nodes(data=True)]
    for node in nodes:
        if node["shape"] and isinstance(node["shape"][0], tuple):
            node["shape"] = [list(s) for s in node["shape"]]
    return {"start": graph.start, "stops": list(graph.stops), "nodes": nodes,
            "edges": [{"source": a, "target": b} for a, b in g.edges()]}


def to_svg(graph: RelevanceGraph, include_params: bool = False) -> str:
    """An SVG drawing of the relevance program (:func:`graph_figure`; text kept as text, so it stays searchable)."""
    import io

    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        graph_figure(graph, include_params).savefig(buffer, format="svg")
    return buffer.getvalue()


def graph_figure(graph: RelevanceGraph, include_params: bool = False):
    """A matplotlib ``Figure`` of the relevance program (no Graphviz needed): one row per longest distance to the
    outputs, top to bottom (so every node sits just above its first consumer); forward nodes grey, seed orange,
    relevance blue, each labelled with its name, target, shape and (relevance nodes) the rule and forward node it
    belongs to."""
    from matplotlib.figure import Figure

    g = to_networkx(graph)
    g = g.subgraph([n for n, d in g.nodes(data=True) if include_params or d["op"] != "get_attr"]).copy()
    layers = list(reversed(list(nx.topological_generations(g.reverse()))))   # by distance to the output
    width = max(len(layer) for layer in layers)
    pos = {name: (i - (len(layer) - 1) / 2, -depth) for depth, layer in enumerate(layers)
           for i, name in enumerate(layer)}
    fig = Figure(figsize=(max(6.0, 2.2 * width), max(3.0, 0.75 * len(layers))))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    for a, b in g.edges():
        ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops={"arrowstyle": "->", "lw": 0.5, "color": "#555555",
                                                               "shrinkA": 9, "shrinkB": 9})
    for name, d in g.nodes(data=True):
        label = f"{name}\n{d['target']}"
        if d.get("shape"):
            label += f" [{_shape_text(d['shape'])}]"
        if d["role"] == "relevance" and d.get("rule"):
            label += f"\n{d['forward_node']} · {d['rule']}"
        ax.text(*pos[name], label, ha="center", va="center", fontsize=5, family="monospace",
                bbox={"boxstyle": "round,pad=0.3", "fc": _ROLE_COLOURS.get(d["role"], "#ffffff"), "lw": 0.4})
    ax.set_xlim(-width / 2 - 0.5, width / 2 + 0.5)
    ax.set_ylim(-len(layers) + 0.5, 0.5)
    return fig
