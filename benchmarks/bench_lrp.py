"""Time fxrel's LRP against plain autograd gradient×input and against zennit, in one run, in one table.

Rows: autograd gradient × input (the baseline), fxrel EpsilonPlusFlat eager, fxrel EpsilonPlusFlat compiled
(``compile=True``; its compile time is reported separately from its steady-state time) and zennit EpsilonPlusFlat
with its canonizer. Each row gives the one-off setup time (fxrel: capture + canonicalise + build the relevance
graph, and compile; zennit: canonizers + hooks), the median of ``--repeats`` timed calls after ``--warmup`` untimed
ones, the ratio to the gradient × input median, and ΣR / logit for row 0 (1 for a conserving explanation).

Models have random weights (no download); BatchNorm running statistics are calibrated on random inputs and the
BatchNorm affine parameters randomised, so that activations keep a sane scale and no residual branch is switched off
(timm zero-initialises the last BatchNorm of each block). zennit's ``ResNetCanonizer`` knows only torchvision's
blocks: on timm ResNets the residual additions stay unhooked, so zennit's relevance is not conserved there (use
``--hub torchvision`` for a like-for-like comparison).

    python benchmarks/bench_lrp.py                                  # timm resnet50, 224×224, batch 8, CPU
    python benchmarks/bench_lrp.py --device cuda
    python benchmarks/bench_lrp.py --model resnet18 --batch 2 --size 64 --repeats 2 --no-compile   # quick check

On a shared or oversubscribed CPU, run with ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts): OpenMP's
spin-waiting threads otherwise make every row 10-40× slower, at random.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

import fxrel
from fxrel.random_weights import calibrate_batchnorm


def build_model(name: str, hub: str, size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if hub == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
    else:
        import torchvision
        model = getattr(torchvision.models, name)(weights=None)
    calibrate_batchnorm(model, size, seed + 1)
    return model.eval().requires_grad_(False)


def zennit_canonizers(name: str, hub: str) -> list:
    from zennit.canonizers import SequentialMergeBatchNorm
    if name.startswith("resnet"):
        from zennit.torchvision import ResNetCanonizer
        return [ResNetCanonizer()]        # torchvision blocks only; on timm only its BatchNorm merge applies
    return [SequentialMergeBatchNorm()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def measure(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int
            ) -> tuple[float, float, torch.Tensor]:
    """(first call, median of ``repeats`` calls after ``warmup`` further untimed calls, last relevance)."""
    first, out = timed(fn, device)
    for _ in range(warmup):
        _, out = timed(fn, device)
    times = []
    for _ in range(repeats):
        t, out = timed(fn, device)
        times.append(t)
    return first, statistics.median(times), out


def gradient_x_input(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Autograd gradient × input of each row's target logit (the benchmarks' baseline)."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
    return grad * x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="model name (timm, or torchvision with --hub)")
    parser.add_argument("--hub", choices=("timm", "torchvision"), default="timm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first, before timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled fxrel row")
    parser.add_argument("--warm-cache", action="store_true",
                        help="let torch.compile use its on-disk cache (default: a fresh one, so the compile time "
                             "reported is a cold compile)")
    parser.add_argument("--no-zennit", action="store_true", help="skip the zennit row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, args.hub, args.size, args.seed).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 2))
    x = x.to(device)
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    rows = torch.arange(args.batch, device=device)
    logit0 = logits[0, target[0]].item()
    onehot = torch.zeros_like(logits)
    onehot[rows, target] = 1.0

    print(f"{args.hub} {args.model}, batch {args.batch}, {args.size}×{args.size}, {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}; "
          f"warm-up {args.warmup}, median of {args.repeats}; row-0 target {target[0].item()}, logit {logit0:.5g}",
          flush=True)

    results: list[tuple[str, float | None, float, float]] = []   # (label, setup s, median s, ΣR/logit row 0)

    def report(label: str, setup: float | None, median: float, relevance: torch.Tensor) -> None:
        ratio = relevance[0].sum().item() / logit0
        results.append((label, setup, median, ratio))
        print(f"  {label}: {median * 1e3:.1f} ms" + (f" (setup {setup:.2f} s)" if setup is not None else ""),
              file=sys.stderr, flush=True)

    # 1. autograd gradient × input (the baseline)
    def grad_x_input() -> torch.Tensor:
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = model(xg)
            (grad,) = torch.autograd.grad(y, xg, grad_outputs=onehot)
        return grad * xg.detach()

    _, median, rel = measure(grad_x_input, device, args.warmup, args.repeats)
    report("autograd gradient × input", None, median, rel)

    # 2. fxrel eager
    eager = fxrel.Explainer(model, "epsilon_plus_flat")
    setup, median, rel = measure(lambda: eager(x, target), device, args.warmup, args.repeats)
    report("fxrel EpsilonPlusFlat eager", setup - median, median, rel)

    # 3. fxrel compiled
    if not args.no_compile:
        with tempfile.TemporaryDirectory(prefix="bench_lrp_inductor_") as cache:
            if not args.warm_cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            compiled = fxrel.Explainer(model, "epsilon_plus_flat", compile=True)
            setup, median, rel = measure(lambda: compiled(x, target), device, args.warmup, args.repeats)
        report(f"fxrel EpsilonPlusFlat compiled ({'warm' if args.warm_cache else 'cold'} cache)", setup - median,
               median, rel)

    # 4. zennit (last: its canonizers modify the model while its context is open)
    if not args.no_zennit:
        try:
            from zennit.attribution import Gradient
            from zennit.composites import EpsilonPlusFlat
        except ImportError:
            print("zennit not installed: skipping its row", file=sys.stderr)
        else:
            composite = EpsilonPlusFlat(canonizers=zennit_canonizers(args.model, args.hub))
            start = time.perf_counter()
            with Gradient(model=model, composite=composite) as attributor:
                enter = time.perf_counter() - start

                def run_zennit() -> torch.Tensor:
                    return attributor(x, lambda y: y.detach() * onehot)[1]

                first, median, rel = measure(run_zennit, device, args.warmup, args.repeats)
            report("zennit EpsilonPlusFlat (+canonizer)", enter + first - median, median, rel)

    base = results[0][2]
    header = ("method", "setup/compile s", "median ms", "× grad×input", "ΣR/logit (row 0)")
    table = [header] + [(label, "-" if setup is None else f"{setup:.2f}", f"{median * 1e3:.1f}",
                         f"{median / base:.2f}", f"{ratio:.6f}") for label, setup, median, ratio in results]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
    print("setup: first call minus one steady-state call (fxrel: capture + canonicalise + build [+ compile]; "
          "zennit: canonizers + hooks + first call overhead)")


if __name__ == "__main__":
    main()
