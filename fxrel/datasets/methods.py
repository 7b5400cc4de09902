"""A method spec as a dataset run calls it: ``(model, x, targets, keys) → (maps [N, H, W], output or None)``.

The maps are :func:`fxrel.evaluation.method_fn`'s (a map equals ``fxrel.explain`` on its image, summed over
channels). A sweep (one relevance graph) runs through its cached :class:`fxrel.Explainer` directly, so that the
model's output comes back with the maps and the run needs no forward pass of its own for the scores; wrappers
(Integrated Gradients, SmoothGrad, UCAG …) return no output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fxrel.catalog.registry import method_info
from fxrel.evaluation import method_fn
from fxrel.explainer import cached_explainer
from fxrel.metrics import as_maps
from fxrel.text import parse_spec

__all__ = ["MapRunner", "map_runner"]

MapRunner = Callable[[nn.Module, torch.Tensor, torch.Tensor, list], tuple[torch.Tensor, torch.Tensor | None]]


def map_runner(spec: str) -> MapRunner:
    """The runner of ``spec`` (checked by :func:`fxrel.evaluation.method_fn`: an unknown method or parameter is an
    :class:`fxrel.InputError` naming it)."""
    fallback = method_fn(spec)
    name, params = parse_spec(spec)
    info = None if ":" in spec else method_info(name)
    if info is None or not info.is_sweep or "keys" in info.defaults:
        def run_wrapper(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, keys: list
                        ) -> tuple[torch.Tensor, None]:
            return fallback(model, x, targets, keys=keys), None
        return run_wrapper

    def run_sweep(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, keys: list
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        explanation = cached_explainer(model, name, **params).attribute(x, targets)
        if len(explanation.relevance) != 1:   # several streams: as method_fn has them
            return fallback(model, x, targets, keys=keys), None
        return as_maps(next(iter(explanation.relevance.values()))), explanation.output
    return run_sweep
