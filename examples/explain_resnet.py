"""Explain a torchvision ResNet-18 (random weights, no network needed) with three methods.

    python examples/explain_resnet.py --out-dir out --size 224

Prints, per method, the relevance sum next to the target logit (LRP methods conserve it up to biases and
stabilisers, the plain gradient does not) and writes ``<out-dir>/explain_resnet.png``: the input and one heatmap
per method (red = evidence for the class, blue = against).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

import fxrel
from fxrel.sample_images import imagenet_normalize, synthetic_image
from fxrel.visualize import save_grid

METHODS = ("gradient", "lrp_0", "epsilon_plus_flat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out", help="folder for the grid PNG (default: out)")
    parser.add_argument("--size", type=int, default=224, help="input side length (default: 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).eval()
    image = synthetic_image(args.size)                  # [3, H, W] in [0, 1]
    x = imagenet_normalize(image).unsqueeze(0)           # [1, 3, H, W]

    with torch.no_grad():
        logits = model(x)[0]
    target = int(logits.argmax())
    print(f"resnet18 (random weights, seed {args.seed}), synthetic image {args.size}x{args.size}")
    print(f"predicted class {target}, logit {logits[target]:+.5f}")
    print(f"{'method':<20} {'relevance sum':>14} {'target logit':>13} {'ratio':>8}")

    maps = []
    for method in METHODS:
        relevance = fxrel.Explainer(model, method)(x, target)
        total, logit = relevance.sum().item(), logits[target].item()
        print(f"{method:<20} {total:>+14.5f} {logit:>+13.5f} {total / logit:>8.4f}")
        maps.append(relevance[0])

    path = save_grid(Path(args.out_dir) / "explain_resnet.png", rows=[f"class {target}"], cols=list(METHODS),
                     maps=[maps], images=[image])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
