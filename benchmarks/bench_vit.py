"""Time fxrel on a vision transformer against autograd gradient×input and LXT, in one run, in one table.

torchvision's ViT-B/16 at 224 px (random weights, the zero-initialised head drawn too; no download; the model LXT
2.1 patches for CP-LRP). Rows:
autograd gradient × input (the baseline), fxrel ``lrp_epsilon`` with CP-LRP (attention weights constant) and with
AttnLRP, eager and compiled (compile time reported apart from the steady state), and LXT's
CP-LRP: gradient × input through its ``lxt.efficient`` patches of GELU, LayerNorm and MultiheadAttention (applied
last, undone afterwards). Each row: setup time (fxrel: capture + canonicalise + build [+ compile]), the median of
``--repeats`` calls after ``--warmup``, the ratio to the baseline, and max|R − R_LXT| / max|R_LXT| for the CP rows.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_vit.py                # ViT-B/16, batch 2, CPU
    python benchmarks/bench_vit.py --batch 1 --repeats 2 --no-compile       # quick check
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import torch
from bench_lrp import measure

import fxrel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the repository root: tests.lxt_reference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-lxt", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torchvision
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torchvision.models.vit_b_16(weights=None).eval().requires_grad_(False)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)   # torchvision zero-initialises the head: logits 0
    model = model.to(device)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    onehot = torch.nn.functional.one_hot(target, 1000).to(x.dtype)
    print(f"torchvision vit_b_16, batch {args.batch}, 224×224, {device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; warm-up {args.warmup}, median of {args.repeats}", flush=True)

    def grad_x_input() -> torch.Tensor:
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model(xg), xg, grad_outputs=onehot)
        return grad * xg.detach()

    rows: list[tuple[str, float | None, float, torch.Tensor, bool]] = []   # label, setup, median, R, is CP
    _, median, relevance = measure(grad_x_input, device, args.warmup, args.repeats)
    rows.append(("autograd gradient × input", None, median, relevance, False))
    for label, attention in (("CP-LRP", "cp"), ("AttnLRP", "attnlrp")):
        explainer = fxrel.Explainer(model, "lrp_epsilon", attention=attention)
        first, median, relevance = measure(lambda e=explainer: e(x, target), device, args.warmup, args.repeats)
        rows.append((f"fxrel lrp_epsilon {label} eager", first - median, median, relevance, attention == "cp"))
    if not args.no_compile:
        for label, attention in (("CP-LRP", "cp"), ("AttnLRP", "attnlrp")):
            with tempfile.TemporaryDirectory(prefix="bench_vit_inductor_") as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
                compiled = fxrel.Explainer(model, "lrp_epsilon", attention=attention, compile=True)
                first, median, relevance = measure(lambda c=compiled: c(x, target), device, args.warmup,
                                                   args.repeats)
            rows.append((f"fxrel lrp_epsilon {label} compiled (cold cache)", first - median, median, relevance,
                         attention == "cp"))
    reference = None
    if not args.no_lxt:
        from tests.lxt_reference import lxt_cp_patches  # LXT is a test-only peer: imported when its row runs
        with lxt_cp_patches():
            _, median, reference = measure(grad_x_input, device, args.warmup, args.repeats)
        rows.append(("LXT 2.1 CP-LRP (efficient patches, gradient × input)", None, median, reference, False))

    base = rows[0][2]
    print(f"{'method':56} {'setup s':>8} {'median ms':>10} {'× grad×input':>13} {'vs LXT':>9}")
    for label, setup, median, relevance, cp in rows:
        gap = (f"{float((relevance - reference).abs().max() / reference.abs().max()):.1e}"
               if cp and reference is not None else "-")
        print(f"{label:56} {'-' if setup is None else f'{setup:.2f}':>8} {median * 1e3:10.1f} "
              f"{median / base:13.2f} {gap:>9}")


if __name__ == "__main__":
    main()
