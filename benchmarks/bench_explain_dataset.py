"""``fxrel.datasets.explain_dataset`` over a folder of generated scenes: resident memory as the run goes, and the
throughput against a plain loop that calls ``fxrel.explain`` per batch and keeps nothing.

The scenes (``fxrel.demo.make_scenes``, test split) are written as PNGs to a temp folder in the ImageFolder layout
(each scene under its first digit), so both sides read and decode the same files. The run's resident memory
(psutil if installed, else ``VmRSS`` of ``/proc/self/status``) is printed after every shard file; a flat column is
the point. ``--dtypes`` also stores the run as float32 and bfloat16 and reports how far float16 (and bfloat16) maps
are from the float32 ones: the largest error of a map relative to its own peak |value|, and the Spearman rank
correlation of each map with its float32 map (the figures in ``fxrel.datasets.run``'s docstring).

    python benchmarks/bench_explain_dataset.py                                   # 2,000 scenes, 64 px, demo-vgg
    python benchmarks/bench_explain_dataset.py --images 400 --threads 1 --dtypes
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import fxrel
from fxrel.cli import build_model
from fxrel.datasets import MapStore, explain_dataset, image_files
from fxrel.demo import make_scenes
from fxrel.metrics import as_maps
from fxrel.text import parse_spec, split_specs


def resident_mib() -> float:
    """This process's resident memory in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_scenes(folder: Path, count: int, size: int, seed: int) -> None:
    """``count`` test scenes as PNGs, each in the folder of its first digit."""
    for start in range(0, count, 256):   # a chunk at a time: the scenes' masks are large
        scenes = make_scenes(min(256, count - start), seed=seed + start, split="test", size=size)
        for k in range(len(scenes)):
            cls = int(scenes.labels[k].nonzero()[0])
            (folder / str(cls)).mkdir(parents=True, exist_ok=True)
            pixels = (scenes.images[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / str(cls) / f"scene{start + k:06d}.png")


def plain_loop(model, folder: Path, methods: list[str], size: int, batch_size: int, workers: int
               ) -> tuple[float, float]:
    """Images per second of a loop calling ``fxrel.explain`` per batch and method (targets: the labels), over the
    whole loop and after its first batch (when the relevance programs are built)."""
    loader = DataLoader(image_files(folder, size), batch_size=batch_size, num_workers=workers)
    count, start, first = 0, time.perf_counter(), None
    for x, labels in loader:
        for spec in methods:
            name, params = parse_spec(spec)
            as_maps(fxrel.explain(model, x, target=labels, method=name, **params)).detach()
        count += len(x)
        if first is None:
            first = (count, time.perf_counter())
    end = time.perf_counter()
    return count / (end - start), (count - first[0]) / (end - first[1])


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of the rows of ``a`` and ``b`` (tied values get their average rank)."""
    from scipy.stats import rankdata

    ra, rb = (torch.from_numpy(rankdata(t.flatten(1).double().numpy(), axis=1)) for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def precision(low: MapStore, exact: MapStore) -> None:
    for spec in exact.methods:
        a, b = low.load(method=spec).maps, exact.load(method=spec).maps
        peak = b.flatten(1).abs().amax(1).clamp(min=1e-30)
        error = ((a - b).flatten(1).abs().amax(1) / peak).max()
        rank = spearman(a.float(), b)
        print(f"  {spec}: {len(b)} maps, max error / map peak {error:.2e}, Spearman min {rank.min():.6f} "
              f"mean {rank.mean():.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="demo-vgg")
    parser.add_argument("--methods", default="epsilon_plus_flat,grad_cam")
    parser.add_argument("--target", default="label")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", action="store_true", help="also store float32 and bfloat16 and compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = split_specs(args.methods)
    model = build_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "scenes", Path(tmp) / "maps"
        write_scenes(folder, args.images, args.size, args.seed)
        print(f"{args.images} scenes at {args.size} px, {args.model}, methods {', '.join(methods)}, target "
              f"{args.target}, batch {args.batch_size}, shards of {args.shard_size}, {args.threads} thread(s), "
              f"{args.workers} loader worker(s)")
        rss, begin = [("start", 0, 0.0, resident_mib())], time.perf_counter()
        shard_count = [0]

        def after_shard(path: Path) -> None:
            shard_count[0] += 1
            rss.append((path.name, shard_count[0], time.perf_counter() - begin, resident_mib()))

        run = explain_dataset(model, folder, out, methods, target=args.target, size=args.size,
                              batch_size=args.batch_size, shard_size=args.shard_size, workers=args.workers,
                              model_name=args.model, on_shard=after_shard)
        print(f"explain_dataset: {run.images_done} images in {run.seconds:.1f} s = {run.images_per_second:.1f} "
              f"images/s, {run.shards_written} shards, {sum(p.stat().st_size for p in out.iterdir()) / 2**20:.1f} "
              "MiB on disk")
        print("resident memory (MiB) after each shard:")
        for name, k, seconds, mib in rss:
            print(f"  {k:4d} {name:32s} {seconds:7.1f} s  {mib:8.1f}")
        after = [mib for _, k, _, mib in rss if k >= 1]
        print(f"  growth from the first shard to the last: {after[-1] - after[0]:+.1f} MiB")
        steady = (run.images_done - args.shard_size) / (rss[-1][2] - rss[1][2]) if len(rss) > 2 else float("nan")
        print(f"  after the first shard (relevance programs built): {steady:.1f} images/s")
        # a model of its own, so that the loop builds its relevance programs as the run did
        rate, rate_after = plain_loop(build_model(args.model), folder, methods, args.size, args.batch_size,
                                      args.workers)
        print(f"plain loop of fxrel.explain per batch: {rate:.1f} images/s, after its first batch {rate_after:.1f}; "
              f"explain_dataset / plain loop = {run.images_per_second / rate:.2f} (after the first shard / batch "
              f"{steady / rate_after:.2f})")
        if args.dtypes:
            stores = {}
            for dtype in ("float32", "bfloat16"):
                explain_dataset(model, folder, Path(tmp) / dtype, methods, target=args.target, size=args.size,
                                batch_size=args.batch_size, shard_size=args.shard_size, dtype=dtype,
                                model_name=args.model)
                stores[dtype] = MapStore(Path(tmp) / dtype)
            for name, store in (("float16", MapStore(out)), ("bfloat16", stores["bfloat16"])):
                print(f"{name} against float32:")
                precision(store, stores["float32"])


if __name__ == "__main__":
    main()
