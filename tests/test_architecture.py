"""The package's layers import one way: an AST walk over ``fxrel/`` (module-level and function-local imports alike)
finds every import of one fxrel module by another, and fails on an import cycle or on an import from a higher layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxrel"

#: the layers, lowest first; a module may import from its own layer and the ones below. Prefixes match a module and
#: its submodules; the longest matching prefix decides.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fxrel.errors", "fxrel.outputs", "fxrel.text", "fxrel.imageops", "fxrel.sample_images", "fxrel.random_weights",
     "fxrel.validation", "fxrel.streams", "fxrel.statistics", "fxrel.version"),
    ("fxrel.graphs",),
    ("fxrel.rules",),
    ("fxrel.catalog",),
    ("fxrel.explainer",),
    ("fxrel.wrappers", "fxrel.cam", "fxrel.ucag", "fxrel.ssl", "fxrel.srd_maps", "fxrel.apop"),
    ("fxrel.metrics", "fxrel.visualize", "fxrel.demo", "fxrel.zoo", "fxrel.evaluation", "fxrel.fidelity",
     "fxrel.coverage"),
    ("fxrel.datasets",),
    ("fxrel", "fxrel.cli", "fxrel.__main__"),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> nx.DiGraph:
    """Module → module edges of the package at ``root`` (every ``import``/``from … import`` anywhere in a file; a
    ``from pkg import name`` that names a submodule is an edge to the submodule)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:      # `import fxrel.graphs.ops.x` → the module it names
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]


def layer_of(module: str) -> int:
    best = max(((len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_architecture.py's LAYERS; give it one")
    return best[1]


def upward_imports(graph: nx.DiGraph) -> list[str]:
    return [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in graph.edges
            if layer_of(b) > layer_of(a)]


def test_fxrel_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_fxrel_imports_only_downwards():
    assert upward_imports(import_graph(PACKAGE)) == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("b_source", [
    "from pkg import a\n",                                        # module level, `from package import module`
    "def f():\n    from pkg.a import x\n    return x\n",          # function-local
    "def f():\n    from . import a\n    return a\n",              # relative
    "import pkg.a.x\n",                                           # a dotted name that is not a module
])
def test_a_planted_cycle_is_found(tmp_path, b_source):
    root = _package(tmp_path, {"__init__.py": "", "a.py": "from pkg.b import f\nx = 1\n", "b.py": b_source})
    assert cycles(import_graph(root)) == [["pkg.a", "pkg.b"]]


def test_an_acyclic_package_passes(tmp_path):
    root = _package(tmp_path, {"__init__.py": "from pkg import a\n", "a.py": "from pkg.sub import c\n",
                               "sub/__init__.py": "", "sub/c.py": "import os\n"})
    graph = import_graph(root)
    assert cycles(graph) == [] and set(graph.edges) == {("pkg", "pkg.a"), ("pkg.a", "pkg.sub.c")}
