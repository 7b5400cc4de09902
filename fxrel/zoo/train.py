"""Train the evaluation zoo reproducibly on CPU with the *plain* recipe and write its weights and ``manifest.json``.

    OMP_WAIT_POLICY=PASSIVE python3 -m fxrel.zoo.train [--models zoo-vgg ...] [--out fxrel/zoo/weights]

The recipe is the demo models' (``fxrel.demo.train``: the same pool of train-split scenes, AdamW with a one-cycle
schedule, BCE-with-logits, fixed seeds, deterministic algorithms) **without** its augmentations: no zoomed crops
and no colour permutation, so nothing in training anticipates an explanation method (UCAG's up-scaled crops are
out of distribution for these models, as they are for a network trained without scale augmentation). Test figures
on ``make_scenes(1000, seed=0, split="test")``: mean per-class F1 at logit > 0, exact-set accuracy and mAP.
"""
from __future__ import annotations

from fxrel.demo.train import DEFAULTS as DEMO_DEFAULTS
from fxrel.demo.train import train_and_ship
from fxrel.zoo.models import WEIGHTS_DIR, ZOO_MODELS, build_zoo_model, zoo_weights_path

DEFAULTS = {**DEMO_DEFAULTS, "batch": 64, "steps": 800, "lr": 1e-3, "crop_fraction": 0.0, "permute_channels": 0}
#: the BatchNorm-free VGG leaves its loss plateau (predicting the label prior) only after ~300 steps; the small
#: SE-gated timm ResNet-D reaches test F1 0.82 (exact-set accuracy 0.51) after 800 steps, 0.98 (0.93) after 1600
#: the ViT, as ViTs do on small data, needs more steps than the CNNs
PER_MODEL = {"zoo-vgg": {"steps": 1600}, "zoo-timm": {"steps": 1600}, "zoo-vit": {"steps": 2000}}


def main(argv: list[str] | None = None) -> None:
    train_and_ship(argv, ZOO_MODELS, build_zoo_model, zoo_weights_path, WEIGHTS_DIR, DEFAULTS,
                   __doc__.splitlines()[0], PER_MODEL)


if __name__ == "__main__":
    main()
