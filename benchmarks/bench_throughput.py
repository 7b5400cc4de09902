"""Explanations per second at several batch sizes and dtypes: autograd gradient × input, fxrel eager and compiled.

For every (dtype, batch): the median time of ``--repeats`` calls after ``--warmup`` (first call apart: it builds,
and compiles for the compiled row), as explanations/s, and the ratio of each fxrel row's time to gradient × input's
in the same run. Models as ``bench_lrp.py`` (random weights, calibrated BatchNorm; timm by default). Runs on CPU and
on CUDA (``--device cuda``: ``torch.cuda.synchronize`` around every call; the issue's GPU target is ≥ 2,000
ResNet-50 224-px EpsilonPlusFlat explanations/s compiled at ≤ 1.3× gradient × input).

    python benchmarks/bench_throughput.py --device cuda                          # resnet50, 224 px, 1/8/32/128
    python benchmarks/bench_throughput.py --model resnet18 --size 64 --batches 1,8 --no-compile   # quick, CPU
"""
from __future__ import annotations

import argparse

import torch
from bench_lrp import build_model, gradient_x_input, measure

import fxrel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--hub", choices=("timm", "torchvision"), default="timm")
    parser.add_argument("--method", default="epsilon_plus_flat")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (a compile per shape)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; valid: {sorted(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = build_model(args.model, args.hub, args.size, 0).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.hub} {args.model}, {args.method}, {args.size} px, {name}, torch {torch.__version__}; "
          f"median of {args.repeats} after {args.warmup} warm-up\n")
    columns = ["dtype", "batch", "gradient × input /s", "eager /s", "eager ×"]
    if not args.no_compile:
        columns += ["compiled /s", "compiled ×"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)
    for dtype_name in args.dtypes.split(","):
        model = base.to(DTYPES[dtype_name])
        eager = fxrel.Explainer(model, args.method)
        compiled = None if args.no_compile else fxrel.Explainer(model, args.method, compile=True)
        for batch in (int(b) for b in args.batches.split(",")):
            print("| " + " | ".join([dtype_name, str(batch), *row(model, eager, compiled, batch, DTYPES[dtype_name],
                                                                 device, args)]) + " |", flush=True)


def row(model: torch.nn.Module, eager: fxrel.Explainer, compiled: fxrel.Explainer | None, batch: int,
        dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> list[str]:
    """The cells of one (dtype, batch) row after the first two."""
    x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
    with torch.no_grad():
        target = model(x).argmax(1)
    _, baseline, _ = measure(lambda: gradient_x_input(model, x, target), device, args.warmup, args.repeats)
    _, ours, _ = measure(lambda: eager(x, target), device, args.warmup, args.repeats)
    cells = [f"{batch / baseline:.1f}", f"{batch / ours:.1f}", f"{ours / baseline:.2f}"]
    if compiled is not None:
        _, fused, _ = measure(lambda: compiled(x, target), device, args.warmup, args.repeats)
        cells += [f"{batch / fused:.1f}", f"{fused / baseline:.2f}"]
    return cells

if __name__ == "__main__":
    main()
