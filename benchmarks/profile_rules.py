"""Where an eager relevance program's time goes, rule by rule: the tables of ``docs/performance.md``.

For each model (torchvision, random weights with calibrated BatchNorm, as ``bench_lrp.py``): the median time of
autograd gradient × input and of the method's eager program (the generated code, not interpreted), then
:func:`fxrel.graphs.profile.profile_program`'s groups by rule (and, with ``--by-op``, by op), as markdown.

    python benchmarks/profile_rules.py                                   # resnet50 and densenet121, batch 8, 224 px
    python benchmarks/profile_rules.py --models resnet18 --batch 2 --size 64 --repeats 1   # quick check
"""
from __future__ import annotations

import argparse

import torch
from bench_lrp import build_model, gradient_x_input, measure

import fxrel
from fxrel.graphs.profile import ProfileRow, profile_program

CPU = torch.device("cpu")


def _markdown(rows: list[ProfileRow], by_op: bool, limit: int) -> str:
    head = "| role | rule | kind |" + (" op |" if by_op else "") + " nodes | ms | % | MB out |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows[:limit]:
        lines.append(f"| {r.role} | {r.rule} | {r.kind} |" + (f" {r.op} |" if by_op else "")
                     + f" {r.nodes} | {r.seconds * 1e3:.1f} | {100 * r.share:.1f} | {r.bytes / 2**20:.1f} |")
    rest = rows[limit:]
    if rest:
        lines.append(f"| (other {len(rest)} groups) | | |" + (" |" if by_op else "")
                     + f" {sum(r.nodes for r in rest)} | {sum(r.seconds for r in rest) * 1e3:.1f} |"
                     f" {100 * sum(r.share for r in rest):.1f} | {sum(r.bytes for r in rest) / 2**20:.1f} |")
    lines.append("| total | | |" + (" |" if by_op else "") + f" {sum(r.nodes for r in rows)} |"
                 f" {sum(r.seconds for r in rows) * 1e3:.1f} | 100.0 | {sum(r.bytes for r in rows) / 2**20:.1f} |")
    return "\n".join(lines)


def profile_model(name: str, args: argparse.Namespace) -> None:
    """One model's section: the two medians, then the table(s)."""
    model = build_model(name, "torchvision", args.size, 0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = model(x).argmax(1)

    explainer = fxrel.Explainer(model, args.method)
    graph = explainer.relevance_graph(x)
    mask, _ = explainer._seed_mask(graph, x, target)
    _, baseline, _ = measure(lambda: gradient_x_input(model, x, target), CPU, 0, args.repeats)
    with torch.no_grad():
        _, program, _ = measure(lambda: graph.module(x, mask), CPU, 0, args.repeats)
    rows = profile_program(graph, (x,), mask, args.repeats)
    print(f"### {name}\n\nautograd gradient × input {baseline * 1e3:.0f} ms; `{args.method}` eager program "
          f"{program * 1e3:.0f} ms ({program / baseline:.2f}×); interpreted for the profile "
          f"{sum(r.seconds for r in rows) * 1e3:.0f} ms\n")
    print(_markdown(rows, False, args.limit) + "\n")
    if args.by_op:
        print(_markdown(profile_program(graph, (x,), mask, args.repeats, by_op=True), True, args.limit) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,densenet121", help="torchvision model names, comma-separated")
    parser.add_argument("--method", default="epsilon_plus_flat")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--by-op", action="store_true", help="also the table by op")
    parser.add_argument("--limit", type=int, default=12, help="rows shown per table (the rest summed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = f"{' --by-op' if args.by_op else ''}"
    print(f"`python benchmarks/profile_rules.py --models {args.models} --method {args.method} --batch {args.batch} "
          f"--size {args.size} --repeats {args.repeats}{flags}` — torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU\n")
    for name in args.models.split(","):
        profile_model(name, args)


if __name__ == "__main__":
    main()
