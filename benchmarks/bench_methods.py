"""Run any rule-set method on VGG16, ResNet-50, DenseNet-121 and Inception-v3 (random weights): batched, eager and
compiled, with timings against the gradient of the same engine and the agreement checks, in one table.

Per model: the one-off setup (capture + canonicalise + build the relevance graph), the eager median and its ratio to
the ``gradient`` method's eager median (the baseline, measured in the same run), the compile time and compiled median,
two errors (max |a − b| / max |b|): batched vs one image at a time and compiled vs eager, whether the result is
finite, and Σ R at the input per image.

    python benchmarks/bench_methods.py --method agf                      # the four models, 64 px (107 for Inception)
    python benchmarks/bench_methods.py --method agf --models resnet50 --size 224 --no-compile
    python benchmarks/bench_methods.py --method agf --device cuda --size 224 --batch 16

On a shared CPU, run with ``OMP_WAIT_POLICY=PASSIVE`` (see ``bench_lrp.py``).
"""
from __future__ import annotations

import argparse
import sys

import torch
from bench_lrp import measure

import fxrel
from fxrel.coverage import relative_error as error
from fxrel.random_weights import calibrate_batchnorm
from fxrel.text import format_table

MODELS = ("vgg16", "resnet50", "densenet121", "inception_v3")


def build(name: str, size: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **extra)
    calibrate_batchnorm(model, size, 1)
    return model.eval().requires_grad_(False).to(device, dtype)


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """One table row: timings and checks of ``args.method`` on one model."""
    size = max(args.size, 107) if name == "inception_v3" else args.size
    model = build(name, size, device, dtype)
    x = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
    targets = torch.arange(args.batch, device=device) % 10
    print(f"{name} @ {size} px, batch {args.batch}, {args.method} …", file=sys.stderr, flush=True)
    gradient = fxrel.Explainer(model, "gradient")
    _, grad_median, _ = measure(lambda: gradient(x, targets), device, 1, args.repeats)
    eager = fxrel.Explainer(model, args.method)
    first, median, batched = measure(lambda: eager(x, targets), device, 1, args.repeats)
    single = torch.cat([eager(x[i:i + 1], targets[i:i + 1]) for i in range(args.batch)])
    compile_s = compiled_median = compiled_error = float("nan")
    if not args.no_compile:
        compiled = fxrel.Explainer(model, args.method, compile=True)
        compile_first, compiled_median, out = measure(lambda: compiled(x, targets), device, 1, args.repeats)
        compile_s, compiled_error = compile_first - compiled_median, error(out, batched)
    return (name, str(size), f"{first - median:.1f}", f"{median * 1e3:.0f}", f"{median / grad_median:.1f}×",
            f"{compile_s:.0f}", f"{compiled_median * 1e3:.0f}", f"{error(single, batched):.1e}",
            f"{compiled_error:.1e}", "yes" if bool(torch.isfinite(batched).all()) else "NO",
            " ".join(f"{v:+.4g}" for v in batched.flatten(1).sum(1).tolist()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="agf")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", type=int, default=64, help="input size (Inception-v3: at least 107, its minimum for "
                        "2×2 last feature maps, is used when smaller)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        rows.append(run_model(name, args, device, dtype))
        print(format_table(HEADER, rows[-1:]), file=sys.stderr, flush=True)
    print(f"\n{args.method}, {args.dtype}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; random weights, calibrated BatchNorm\n")
    print(format_table(HEADER, rows))


HEADER = ("model", "px", "setup s", "eager ms", "÷ gradient", "compile s", "compiled ms", "batched vs single",
          "compiled vs eager", "finite", "Σ R per image")


if __name__ == "__main__":
    main()
