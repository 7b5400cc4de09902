"""All classes in one sweep: the cost per (image, class) row of ``Explainer.classes`` against a single-target call.

One image, K classes: K single-target calls (batch 1) against one ``Explainer.classes(x, K classes)`` call (a batch
of K rows), eager, medians of ``--repeats`` after a warm-up, torchvision models with random weights and calibrated
BatchNorm.

    python benchmarks/bench_classes.py                       # resnet50, 224 px, K = 4 and 10, epsilon_plus_flat
    python benchmarks/bench_classes.py --model resnet18 --size 64 --classes 2,4
"""
from __future__ import annotations

import argparse

import torch
from bench_lrp import build_model, measure

import fxrel

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name")
    parser.add_argument("--method", default="epsilon_plus_flat")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", default="4,10", help="values of K, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, "torchvision", args.size, 0)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    explainer = fxrel.Explainer(model, args.method)
    _, single, _ = measure(lambda: explainer(x, 0), CPU, 0, args.repeats)
    print(f"torchvision {args.model}, {args.method}, {args.size} px, eager, {torch.get_num_threads()} threads; "
          f"one single-target call {single * 1e3:.0f} ms")
    print("| K | K single-target calls ms | classes(x, K) ms | per row × single call |")
    print("|---|---|---|---|")
    for k in (int(v) for v in args.classes.split(",")):
        _, batched, _ = measure(lambda k=k: explainer.classes(x, list(range(k))), CPU, 0, args.repeats)
        print(f"| {k} | {k * single * 1e3:.0f} | {batched * 1e3:.0f} | {batched / k / single:.2f} |", flush=True)


if __name__ == "__main__":
    main()
