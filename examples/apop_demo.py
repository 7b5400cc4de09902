"""APOP on the trained demo models (SRD paper, Table 1 / Table 3): predict from zeros, ones or noise with the
activation pattern of a real test scene frozen, and compare with the original predictions.

A prediction is a hit when the top-1 class is present in the scene (the scenes hold one to three digits); chance is
the mean number of digits per scene over the ten classes. Agreement: the APOP top-1 equals the original top-1.

    python examples/apop_demo.py                  # 64 test scenes, all four demo models
    python examples/apop_demo.py --scenes 256 --models demo-vgg
"""
from __future__ import annotations

import argparse

import torch

from fxrel.apop import PROBES, apop_predict
from fxrel.demo import DEMO_MODELS, demo_model, make_scenes
from fxrel.text import format_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=DEMO_MODELS)
    args = parser.parse_args(argv)
    scenes = make_scenes(args.scenes, seed=7, split="test")
    x, labels = scenes.images, scenes.labels
    chance = labels.float().sum(1).mean().item() / labels.shape[1]
    rows = []
    for name in args.models:
        model = demo_model(name)
        with torch.no_grad():
            original = model(x).argmax(1)
        rows.append((name, "original", "-", f"{labels[torch.arange(len(x)), original].float().mean():.3f}", "1.000"))
        for probe in PROBES:
            for relu in (False, True):
                top = apop_predict(model, x, probe, relu=relu).argmax(1)
                hits = labels[torch.arange(len(x)), top].float().mean().item()
                rows.append((name, f"APOP{' & relu' if relu else ''}", probe, f"{hits:.3f}",
                             f"{(top == original).float().mean():.3f}"))
    print(f"{args.scenes} test scenes; chance (top-1 among the present digits): {chance:.3f}\n")
    print(format_table(("model", "setting", "probe", "top-1 hit rate", "agrees with original"), rows))


if __name__ == "__main__":
    main()
