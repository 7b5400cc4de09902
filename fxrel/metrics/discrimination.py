"""Class-discrimination metrics: does a class's map tell its object apart from the *other* objects in the image?

A map can point at *an* object without pointing at the *right* one; on scenes with several labelled objects these
two metrics measure what the contrastive papers (CLRP, SGLRP, RSP, AGF) promise and the pointing game does not.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fxrel.errors import InputError
from fxrel.metrics.localisation import _check_maps, _check_masks


def discrimination(maps: Tensor, target_masks: Tensor, other_masks: Tensor) -> Tensor:
    """Share of the positive relevance on the target's region out of the target's and the other objects' regions.
    Higher ↑.

    ``disc = Σ_{target} M⁺ / (Σ_{target} M⁺ + Σ_{others \\ target} M⁺)``, ``M⁺ = max(M, 0)``; background relevance is
    left out, so 0.5 is what a map gets that cannot tell two objects apart. NaN where there is no other object (the
    question does not arise) and 0 where the objects' regions hold no positive relevance.
    """
    maps, target_masks = _check_masks(maps, target_masks)
    if tuple(other_masks.shape) != tuple(maps.shape):
        raise InputError(f"other_masks have shape {tuple(other_masks.shape)} but maps have {tuple(maps.shape)}")
    other = other_masks.to(device=maps.device, dtype=torch.bool) & ~target_masks
    positive = maps.clamp(min=0).flatten(1)
    on_target = (positive * target_masks.flatten(1)).sum(1)
    on_others = (positive * other.flatten(1)).sum(1)
    total = on_target + on_others
    share = torch.where(total > 0, on_target / total.where(total > 0, torch.ones_like(total)), torch.zeros_like(total))
    return torch.where(other.flatten(1).any(1), share, torch.full_like(share, float("nan")))


def map_correlation(maps: Tensor, other_maps: Tensor, valid: Tensor | None = None) -> Tensor:
    """Pearson correlation over pixels of two maps of one image for two different classes. Lower ↓: a method whose
    maps of different classes correlate near 1 explains the image, not the class.

    ``valid`` (bool ``[B]``): samples that have a second class; the others are NaN. A constant map correlates 0.
    """
    maps, other_maps = _check_maps(maps), _check_maps(other_maps)
    if maps.shape != other_maps.shape:
        raise InputError(f"maps {tuple(maps.shape)} and other_maps {tuple(other_maps.shape)} differ in shape")
    a = maps.flatten(1) - maps.flatten(1).mean(1, keepdim=True)
    b = other_maps.flatten(1) - other_maps.flatten(1).mean(1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    r = torch.where(norm > 0, (a * b).sum(1) / norm.where(norm > 0, torch.ones_like(norm)), torch.zeros_like(norm))
    if valid is not None:
        r = torch.where(valid.to(r.device), r, torch.full_like(r, float("nan")))
    return r
