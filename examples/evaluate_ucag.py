"""UCAG on a trained demo model, scored with fxrel.metrics: Grad-CAM alone vs Grad-CAM under UCAG.

Run: ``python3 examples/evaluate_ucag.py [--model demo-resnet] [--images 16] [--out-dir out]``. Works offline:
the scenes are generated and the demo model ships with fxrel. Writes a grid (rows: image and class; columns:
Grad-CAM, UCAG(Grad-CAM)) and prints pointing game, energy pointing game and insertion/deletion for both.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fxrel
from fxrel import metrics, visualize
from fxrel.demo import CLASS_NAMES, demo_model, make_scenes
from fxrel.ucag import ucag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-resnet")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out-dir", default="out")
    args = parser.parse_args(argv)

    scenes = make_scenes(args.images, seed=1, split="test")
    model = demo_model(args.model)
    pairs = [(i, int(c)) for i in range(len(scenes)) for c in scenes.labels[i].nonzero().flatten()]
    rows = torch.tensor([i for i, _ in pairs])
    targets = torch.tensor([c for _, c in pairs])
    x = scenes.images[rows]
    boxes = metrics.box_masks(scenes.boxes[rows, targets], *x.shape[-2:])

    maps = {"grad_cam": fxrel.explain(model, x, targets, method="grad_cam", upsample="input"),
            "ucag(grad_cam)": ucag(model, x, targets, method="grad_cam", weighting="sigmoid")}
    print(f"{args.model}: {len(scenes)} scenes, {len(pairs)} (image, class) pairs")
    print(f"{'method':16} {'PG':>6} {'EPG':>6} {'Ins':>6} {'Del':>6}")
    for name, m in maps.items():
        curves = metrics.insertion_deletion(model, x, m, targets, score="sigmoid")
        print(f"{name:16} {metrics.pointing_game(m, boxes, tolerance=1).mean():6.3f} "
              f"{metrics.energy_pointing_game(m, boxes).mean():6.3f} {curves['insertion'].mean():6.3f} "
              f"{curves['deletion'].mean():6.3f}")

    shown = min(6, len(pairs))
    grid = visualize.save_grid(Path(args.out_dir) / "evaluate_ucag.png",
                               [f"image {i}: {CLASS_NAMES[c]}" for i, c in pairs[:shown]], list(maps),
                               [[m[k] for m in maps.values()] for k in range(shown)],
                               images=list(x[:shown]), overlay_alpha=0.6)
    print(f"grid: {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
