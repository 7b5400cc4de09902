"""Peak memory of one explanation against autograd gradient × input, in one run, in one table.

Each row runs in a fresh process, which builds the model (``bench_lrp.build_model``: random weights, BatchNorm
calibrated), makes one warm-up call (capture, canonicalisation and the relevance graph are built then) and
measures a second call:

* on CPU, the peak resident-memory growth during the call over the resident memory just before it, with RSS
  sampled every 0.5 ms by a thread (psutil, which this benchmark needs) and glibc made to return every block of
  64 KiB or more on free (``MALLOC_MMAP_THRESHOLD_``), so that RSS follows the live tensors;
* on CUDA, ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it.

The ratio column divides by the gradient × input row of the same model. Methods: ``gradient_x_input`` (autograd, the
baseline) and any fxrel method name, eager.

    python benchmarks/bench_memory.py                                         # torchvision resnet50 and vit_b_16, CPU
    python benchmarks/bench_memory.py --models resnet18 --batch 2 --size 64   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from bench_lrp import build_model

BASELINE = "gradient_x_input"
#: glibc maps every block of 64 KiB or more on its own and unmaps it when freed, so that resident memory follows the
#: live tensors (by default the warm-up's peak stays resident and the measured call seems to need nothing)
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def build(name: str, size: int, seed: int) -> torch.nn.Module:
    """``bench_lrp``'s torchvision model (random weights, BatchNorm calibrated), a ViT's zero-initialised head drawn
    so that its logits are not 0."""
    model = build_model(name, "torchvision", size, seed)
    if hasattr(model, "heads"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def explanation(model: torch.nn.Module, method: str, x: torch.Tensor, target: torch.Tensor):
    if method == BASELINE:
        def autograd_call() -> torch.Tensor:
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
            return grad * xg.detach()
        return autograd_call
    import fxrel

    explainer = fxrel.Explainer(model, method)
    return lambda: explainer.attribute(x, target).relevance


def peak_growth(call, device: torch.device) -> int:
    """Bytes above the level just before ``call``, at its peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = call()
    peak[0] = max(peak[0], process.memory_info().rss)
    done.set()
    sampler.join()
    del result
    return peak[0] - before


def child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model = build(args.models[0], args.size, args.seed).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 1))
    x = x.to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    call = explanation(model, args.methods[0], x, target)
    call()   # warm-up: graphs built, caches filled
    print(json.dumps({"bytes": peak_growth(call, device)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"], help="torchvision model names")
    parser.add_argument("--methods", nargs="+", default=[BASELINE, "epsilon_plus_flat", "lrp_epsilon"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    print(f"batch {args.batch}, {args.size}×{args.size}, {args.device}, torch {torch.__version__}; one call after a "
          "warm-up, each row in its own process", flush=True)
    print(f"{'model':<12}{'method':<22}{'peak growth MB':>16}{'× grad×input':>14}")
    for model in args.models:
        baseline = None
        for method in dict.fromkeys([BASELINE, *args.methods]):
            command = [sys.executable, __file__, "--child", "--models", model, "--methods", method, "--batch",
                       str(args.batch), "--size", str(args.size), "--device", args.device, "--seed", str(args.seed)]
            done = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV)
            if done.returncode != 0:
                print(f"{model:<12}{method:<22}  failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            grown = json.loads(done.stdout.strip().splitlines()[-1])["bytes"] / 2 ** 20
            baseline = grown if method == BASELINE else baseline
            ratio = f"{grown / baseline:.2f}" if baseline and baseline >= 1 else "-"   # under 1 MB: noise
            print(f"{model:<12}{method:<22}{grown:>16.0f}{ratio:>14}", flush=True)


if __name__ == "__main__":
    main()
