"""Train the demo models reproducibly on CPU and write their weights and ``manifest.json``.

    OMP_WAIT_POLICY=PASSIVE python3 -m fxrel.demo.train [--models demo-vgg ...] [--out fxrel/demo/weights]

(``OMP_WAIT_POLICY=PASSIVE`` changes no number; it only keeps the two OpenMP threads from spin-waiting, which
slows training several-fold on a machine shared with other processes.)

Data: a fixed pool of train-split scenes (generated in chunks with fixed seeds), each batch with a random
permutation of the colour channels (label-preserving: digit and background colours are drawn symmetrically) and,
for half of its images, a random square crop up-scaled back to 64 px (side 24–64 px, i.e. zoom 1–2.7×, the range
of UCAG's up-scaled crops; a class stays labelled when at least 60 % of its box is inside the crop) — the
scale augmentation ImageNet models get from random-resized crops, without which crops of a scene are out of
distribution.
Optimiser: AdamW with a one-cycle schedule, BCE-with-logits. Seeds, thread count and deterministic algorithms are
fixed, so the same command on the same software stack gives the same weights. Metrics are measured on
``make_scenes(1000, seed=0, split="test")``: mean per-class F1 at logit > 0, exact-set accuracy and mAP.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score
from torch import nn
from tqdm import tqdm

from fxrel.demo.models import DEMO_MODELS, WEIGHTS_DIR, build_model, weights_path
from fxrel.demo.scenes import make_scenes

DEFAULTS = {"seed": 0, "data_seed": 1000, "pool": 24000, "chunk": 2000, "batch": 128, "steps": 800, "lr": 3e-3,
            "weight_decay": 1e-4, "test_scenes": 1000, "test_seed": 0, "crop_fraction": 0.5, "crop_min": 24,
            "permute_channels": 1}
VISIBLE = 0.6   #: fraction of a class's box that must remain inside a crop for the class to stay labelled


def training_pool(size: int, chunk: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` train-split scenes: images [size, 3, 64, 64], float multi-hot labels [size, 10], boxes [size, 10, 4]."""
    images, labels, boxes = [], [], []
    for k, start in enumerate(tqdm(range(0, size, chunk), desc="scenes", unit="chunk")):
        scenes = make_scenes(min(chunk, size - start), seed=data_seed + k, split="train")
        images.append(scenes.images)
        labels.append(scenes.labels.float())
        boxes.append(scenes.boxes)
    return torch.cat(images), torch.cat(labels), torch.cat(boxes)


def crop_zoom(images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator,
              fraction: float, min_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random square crop (side ``min_side``…H) of a random ``fraction`` of the images, resized back to H×W
    (bilinear ``roi_align``); labels keep the classes with at least ``VISIBLE`` of their box inside the crop."""
    from torchvision.ops import roi_align

    n, _, height, width = images.shape
    chosen = torch.rand(n, generator=generator) < fraction
    side = (min_side + torch.rand(n, generator=generator) * (height - min_side)).floor()
    x0 = (torch.rand(n, generator=generator) * (width - side + 1)).floor()
    y0 = (torch.rand(n, generator=generator) * (height - side + 1)).floor()
    side, x0, y0 = (torch.where(chosen, v, d) for v, d in ((side, torch.full_like(side, height)),
                                                           (x0, torch.zeros_like(x0)), (y0, torch.zeros_like(y0))))
    rois = torch.stack([torch.arange(n, dtype=images.dtype), x0, y0, x0 + side, y0 + side], dim=1)
    cropped = roi_align(images, rois, output_size=(height, width), aligned=True, sampling_ratio=2)
    b = boxes.to(images.dtype)
    inter_w = (torch.minimum(b[..., 2], (x0 + side)[:, None]) - torch.maximum(b[..., 0], x0[:, None])).clamp(min=0)
    inter_h = (torch.minimum(b[..., 3], (y0 + side)[:, None]) - torch.maximum(b[..., 1], y0[:, None])).clamp(min=0)
    area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).clamp(min=1)
    visible = inter_w * inter_h / area >= VISIBLE
    return cropped, labels * visible.to(labels.dtype)


def permute_channels(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image with its own random permutation of the RGB channels."""
    order = torch.rand(len(images), 3, generator=generator).argsort(dim=1)
    return images.gather(1, order[:, :, None, None].expand_as(images))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean per-class F1 at logit > 0, exact-set accuracy and mean average precision."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(part) for part in images.split(250)]).numpy()
    truth = labels.numpy().astype(bool)
    predicted = logits > 0
    return {"f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "exact_set_accuracy": float((predicted == truth).all(axis=1).mean()),
            "map": float(average_precision_score(truth, logits, average="macro"))}


def train_model(name: str, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, config: dict,
                build: Callable[[str], nn.Module] = build_model) -> tuple[nn.Module, float]:
    """Train ``build(name)`` on the pool; returns the model (eval mode) and the training time in seconds.
    ``config["crop_fraction"] = 0`` and ``config["permute_channels"] = 0`` give the plain recipe (whole scenes)."""
    torch.manual_seed(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])
    model = build(name).to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config["lr"], total_steps=config["steps"])
    order = torch.empty(0, dtype=torch.long)
    start = time.perf_counter()
    with tqdm(range(config["steps"]), desc=name, unit="step") as bar:
        for _ in bar:
            if len(order) < config["batch"]:
                order = torch.cat([order, torch.randperm(len(images), generator=generator)])
            batch, order = order[:config["batch"]], order[config["batch"]:]
            x, y = images[batch], labels[batch]
            if config["crop_fraction"] > 0:
                x, y = crop_zoom(x, y, boxes[batch], generator, config["crop_fraction"], config["crop_min"])
            if config["permute_channels"]:
                x = permute_channels(x, generator)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    return model.to(memory_format=torch.contiguous_format).eval(), seconds


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_and_ship(argv: list[str] | None, names: Sequence[str], build: Callable[[str], nn.Module],
                   weights_path: Callable[[str, Path], Path], weights_dir: Path, defaults: dict,
                   description: str, per_model: dict[str, dict] | None = None) -> None:
    """The command line shared by the demo models and the evaluation zoo: train each of ``names`` with ``defaults``
    (every key a ``--flag``; ``per_model[name]`` overrides the defaults a flag did not set), write its weights
    (float32 state dict) and its ``manifest.json`` entry (hash, parameter count, training time and configuration,
    software versions, test figures)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(names), choices=names)
    parser.add_argument("--out", type=Path, default=weights_dir)
    for key, value in defaults.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    given = {key: getattr(args, key) for key in defaults if getattr(args, key) is not None}
    config = {**defaults, **given}

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    images, labels, boxes = training_pool(config["pool"], config["chunk"], config["data_seed"])
    test = make_scenes(config["test_scenes"], seed=config["test_seed"], split="test")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in args.models:
        model_config = {**config, **(per_model or {}).get(name, {}), **given}
        model, seconds = train_model(name, images, labels, boxes, model_config, build)
        metrics = evaluate(model, test.images, test.labels.float())
        path = weights_path(name, args.out)
        torch.save({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
                   path)
        manifest[name] = {"file": path.name, "sha256": sha256(path), "parameters": sum(p.numel() for p in
                          model.parameters()), "train_seconds": round(seconds, 1), "training": model_config,
                          "torch": torch.__version__, "numpy": np.__version__,
                          "test": {k: round(v, 4) for k, v in metrics.items()}}
        print(f"{name}: test F1 {metrics['f1']:.4f}, exact-set accuracy {metrics['exact_set_accuracy']:.4f}, "
              f"mAP {metrics['map']:.4f} ({seconds:.0f} s)", flush=True)
        ordered = {key: manifest[key] for key in names if key in manifest}
        manifest_path.write_text(json.dumps(ordered, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    train_and_ship(argv, DEMO_MODELS, build_model, weights_path, WEIGHTS_DIR, DEFAULTS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
