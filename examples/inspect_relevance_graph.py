"""Inspect what fxrel computes: the rule plan, the relevance program, its graph, and the conservation audit.

    python examples/inspect_relevance_graph.py --out-dir out

Builds torchvision's ResNet-18 (random weights), assigns LRP rules with the EpsilonPlusFlat preset plus two user
overrides (by module pattern and by node kind), and writes the rule plan, the relevance program's Python code, its
Graphviz DOT file and the per-layer relevance table to ``--out-dir``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import networkx as nx
import torch
import torchvision

import fxrel
from fxrel.graphs.export import to_dot, to_networkx
from fxrel.random_weights import calibrate_batchnorm
from fxrel.rules import Epsilon, Gradient, kind, module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out", type=Path)
    parser.add_argument("--size", default=64, type=int)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = calibrate_batchnorm(torchvision.models.resnet18(weights=None), args.size)
    x = torch.randn(2, 3, args.size, args.size)
    explainer = fxrel.Explainer(model, "epsilon_plus_flat",
                                rules=[(module("layer4.*"), Epsilon(0.25)), (kind("avgpool"), Gradient())])
    graph = explainer.relevance_graph(x)
    g = to_networkx(graph)
    roles = nx.get_node_attributes(g, "role")
    print(f"relevance graph: {g.number_of_nodes()} nodes ({sum(r == 'relevance' for r in roles.values())} relevance, "
          f"{sum(r == 'forward' for r in roles.values())} forward), acyclic: {nx.is_directed_acyclic_graph(g)}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"rule_plan.txt": str(explainer.rule_plan(x)), "relevance_graph.py": graph.code,
               "relevance_graph.dot": to_dot(graph), "layer_table.txt": explainer.layer_table(x, [1, 2])}
    for name, text in outputs.items():
        (args.out_dir / name).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out_dir / name}")
    print("\n".join(outputs["layer_table.txt"].splitlines()[:8]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
