"""SRD at several layers of a trained demo model, next to AGF: one grid, rows = (scene, class), columns = SRD at the
input, at 1/8 resolution ("high") and at the encoder output ("low"), each upsampled to the image, and AGF.

Run: ``python3 examples/srd_layers.py [--model demo-resnet] [--images 3] [--out-dir out]`` (offline). Prints the
map sizes and each map's sum: the same at every layer (SRD keeps Σ R exactly from stage to stage) but the input,
where the first convolution's bias share is absorbed (``input_bias="absorbed"``, the default; ``"shared"`` keeps it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fxrel
from fxrel import visualize
from fxrel.demo import CLASS_NAMES, demo_model, make_scenes
from fxrel.srd_maps import srd_maps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-resnet")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--init", default="logit_share", help="srd initial sharing ratio (paper/logit_share/grad_cam)")
    parser.add_argument("--input-bias", default="absorbed", choices=("absorbed", "shared"),
                        help="the first convolution's bias share: absorbed (default) or shared with the pixels")
    parser.add_argument("--out-dir", default="out")
    args = parser.parse_args(argv)

    scenes = make_scenes(args.images, seed=2, split="test")
    model = demo_model(args.model)
    pairs = [(i, int(c)) for i in range(len(scenes)) for c in scenes.labels[i].nonzero().flatten()]
    rows, targets = torch.tensor([i for i, _ in pairs]), torch.tensor([c for _, c in pairs])
    x = scenes.images[rows]
    explainer = fxrel.Explainer(model, "srd", init=args.init, input_bias=args.input_bias)
    raw = srd_maps(model, x, targets, explainer=explainer)
    shown = srd_maps(model, x, targets, upsample="input", explainer=explainer)
    agf = fxrel.explain(model, x, targets, method="agf").sum(1)
    for label, m in raw.items():
        print(f"SRD-{label}: {tuple(m.shape[1:])}, Σ per pair {[round(v, 4) for v in m.flatten(1).sum(1).tolist()]}")
    columns = [f"SRD-{label}" for label in shown] + ["AGF"]
    cells = [[shown[label][k] for label in shown] + [agf[k]] for k in range(len(pairs))]
    out = Path(args.out_dir) / "srd_layers.png"
    visualize.save_grid(out, [f"scene {i}: {CLASS_NAMES[c]}" for i, c in pairs], columns, cells,
                        images=list(x), overlay_alpha=0.6)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
