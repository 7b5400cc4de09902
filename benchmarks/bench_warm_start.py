"""Compile once per machine: how long a second process takes to reach steady state with a compiled explainer.

Runs the same child process ``--runs`` times (default 2) against one inductor cache directory: the first compiles
cold (a fresh temporary cache unless ``--cache-dir`` is given), the later ones find torch's FX-graph cache on disk.
Each child builds ``fxrel.Explainer(model, method, compile=True)`` and reports the build (capture, canonicalise,
relevance graph), the first call (dynamo tracing, and inductor compiling or loading from the cache), and the median
of three steady calls; "to steady state" is build + first call.

    python benchmarks/bench_warm_start.py                        # torchvision resnet50, batch 1, 224 px, CPU
    python benchmarks/bench_warm_start.py --model resnet18 --size 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, time
import torch, torchvision
import fxrel
name, method, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = getattr(torchvision.models, name)(weights=None).eval()
x = torch.randn(1, 3, size, size)
start = time.perf_counter()
explainer = fxrel.Explainer(model, method, compile=True)
explainer.relevance_graph(x)
built = time.perf_counter()
explainer(x, 0)
first = time.perf_counter()
steady = []
for _ in range(3):
    t = time.perf_counter()
    explainer(x, 0)
    steady.append(time.perf_counter() - t)
print(json.dumps({"build": built - start, "first": first - built, "steady": statistics.median(steady)}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name")
    parser.add_argument("--method", default="epsilon_plus_flat")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-dir", default=None,
                        help="the inductor cache to use (default: a fresh temporary one, so run 1 is cold)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache_dir or fresh
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        print(f"torchvision {args.model}, {args.method}, batch 1, {args.size} px, CPU; TORCHINDUCTOR_CACHE_DIR={cache}")
        print("| process | build s | first call s | to steady state s | steady ms |")
        print("|---|---|---|---|---|")
        for run in range(1, args.runs + 1):
            done = subprocess.run([sys.executable, "-c", CHILD, args.model, args.method, str(args.size)], env=env,
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            label = "1 (cold cache)" if run == 1 and not args.cache_dir else f"{run}"
            print(f"| {label} | {row['build']:.2f} | {row['first']:.2f} | {row['build'] + row['first']:.2f} | "
                  f"{row['steady'] * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
