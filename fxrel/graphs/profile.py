"""Where a relevance program spends its time: every node of the program timed as it runs, summed by what it does.

The program (:class:`~fxrel.graphs.builder.RelevanceGraph`) is run by an ``fx.Interpreter`` that times each node
(the device synchronised after it on CUDA). Nodes are grouped by their ``fxrel_role`` and what they serve:

* ``forward`` and ``recomputed`` nodes (the canonical forward pass, and the values
  :mod:`~fxrel.graphs.rematerialise` recomputes for the backward pass) by the canonical op kind they compute;
* ``relevance`` nodes by their rule (``fxrel_rule``) and the kind of the forward node the rule serves;
* ``seed`` nodes (the initial relevance) as one group;

and with ``by_op`` also by the op each node calls (``convolution``, ``mul``, ``where`` …).

Each group reports its node count, the median over ``repeats`` runs of its summed time, its share of the program's
total and the bytes its nodes' outputs allocate (the memory traffic the rule adds, not a peak: see
``benchmarks/bench_memory.py`` for that). Interpreting adds a few microseconds per node to what the generated code
costs, so the figures are for comparing rules, not an absolute speed (``benchmarks/bench_lrp.py``).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

from fxrel.graphs.builder import RelevanceGraph
from fxrel.text import format_table

__all__ = ["ProfileRow", "profile_program", "profile_table"]


@dataclass(frozen=True)
class ProfileRow:
    role: str       #: forward, recomputed, seed or relevance
    rule: str       #: the rule (relevance nodes), "-" otherwise
    kind: str       #: canonical kind of the forward node computed or served
    op: str         #: the op the nodes call (``by_op``), "-" otherwise
    nodes: int      #: program nodes in the group
    seconds: float  #: median over the runs of the group's summed time
    share: float    #: of the whole program's time
    bytes: int      #: allocated by the group's outputs, per run


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target)).split(".")[0]


def _group(node: fx.Node, kinds: dict[str, str], by_op: bool) -> tuple[str, str, str, str] | None:
    role = node.meta.get("fxrel_role")
    if node.op not in ("call_function", "call_method") or role is None:
        return None
    op = _op_name(node) if by_op else "-"
    served = kinds.get(node.meta.get("fxrel_forward", ""), node.meta.get("fxrel_kind", "")) or "-"
    if role == "relevance":
        return role, str(node.meta.get("fxrel_rule", "-")), served, op
    if role == "seed":
        return role, "-", "-", op
    return role, "-", node.meta.get("fxrel_kind", served) or "-", op


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class _Timed(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, groups: dict[fx.Node, tuple[str, ...]],
                 device: torch.device) -> None:
        super().__init__(module)
        self.groups, self.cuda = groups, device.type == "cuda"
        self.seconds: dict[tuple[str, ...], float] = defaultdict(float)
        self.bytes: dict[tuple[str, ...], int] = defaultdict(int)

    def run_node(self, n: fx.Node) -> Any:
        group = self.groups.get(n)
        if group is None:
            return super().run_node(n)
        start = time.perf_counter()
        out = super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[group] += time.perf_counter() - start
        self.bytes[group] += _nbytes(out)
        return out


def profile_program(graph: RelevanceGraph, inputs: Sequence[torch.Tensor], seed_mask: torch.Tensor,
                    repeats: int = 3, by_op: bool = False) -> list[ProfileRow]:
    """Time ``graph``'s program on ``(*inputs, seed_mask)`` ``repeats`` times (after one untimed run); the groups of
    the module docstring, slowest first."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    kinds = {n.name: n.meta.get("fxrel_kind", "") for n in graph.canonical.graph.nodes}
    groups = {n: g for n in graph.module.graph.nodes if (g := _group(n, kinds, by_op)) is not None}
    device = seed_mask.device
    runs = []
    with torch.no_grad():
        for i in range(repeats + 1):
            timed = _Timed(graph.module, groups, device)
            timed.run(*inputs, seed_mask)
            if i:
                runs.append(timed)
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for g in groups.values():
        counts[g] += 1
    medians = {g: statistics.median(r.seconds[g] for r in runs) for g in counts}
    total = sum(medians.values()) or 1.0
    rows = [ProfileRow(*g, counts[g], medians[g], medians[g] / total, runs[-1].bytes[g]) for g in counts]
    return sorted(rows, key=lambda r: -r.seconds)


def profile_table(rows: Sequence[ProfileRow]) -> str:
    """The rows as a text table, with a total line."""
    by_op = any(r.op != "-" for r in rows)
    body = [(r.role, r.rule, r.kind, *((r.op,) if by_op else ()), str(r.nodes), f"{r.seconds * 1e3:.1f}",
             f"{100 * r.share:.1f}", f"{r.bytes / 2**20:.1f}") for r in rows]
    body.append(("total", "", "", *(("",) if by_op else ()), str(sum(r.nodes for r in rows)),
                 f"{sum(r.seconds for r in rows) * 1e3:.1f}", "100.0", f"{sum(r.bytes for r in rows) / 2**20:.1f}"))
    header = ("role", "rule", "kind", *(("op",) if by_op else ()), "nodes", "ms", "%", "MB out")
    return format_table(header, body)
