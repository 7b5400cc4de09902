"""Localisation metrics: does the attribution fall on the ground-truth region of the target object?

Also home of the map helpers every metric module shares: :func:`as_maps`, :func:`box_masks` and the input checks
``_check_maps`` / ``_check_masks`` (one place that words the errors).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fxrel.errors import InputError


def as_maps(attribution: Tensor) -> Tensor:
    """A ``[B, H, W]`` map as is; a ``[B, C, H, W]`` attribution summed over its channels."""
    if not isinstance(attribution, Tensor):
        raise InputError(f"attribution must be a torch.Tensor, got {type(attribution).__name__}")
    if attribution.dim() == 4:
        return attribution.sum(1)
    if attribution.dim() == 3:
        return attribution
    raise InputError(f"attribution must be [B, H, W] or [B, C, H, W], got shape {tuple(attribution.shape)}")


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Bool ``[B, H, W]`` masks of ``(x0, y0, x1, y1)`` pixel boxes (``x1``/``y1`` exclusive, clipped to the image)."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise InputError(f"boxes must be [B, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def _check_maps(maps: Tensor, batch: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """``as_maps(maps)`` as a float tensor, after checking batch size, spatial size and finiteness."""
    maps = as_maps(maps)
    if not maps.is_floating_point():
        maps = maps.to(torch.get_default_dtype())
    if batch is not None and maps.shape[0] != batch:
        raise InputError(f"maps hold {maps.shape[0]} samples but the batch has {batch}")
    if size is not None and tuple(maps.shape[1:]) != tuple(size):
        raise InputError(f"maps are {tuple(maps.shape[1:])} (H, W) but the inputs are {tuple(size)}")
    bad = ~torch.isfinite(maps).flatten(1).all(1)
    if bad.any():
        raise InputError(f"maps contain NaN or inf values (samples {bad.nonzero().flatten().tolist()})")
    return maps


def _check_masks(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Checked ``(maps, masks)``: same ``[B, H, W]`` shape, masks bool and non-empty in every sample."""
    maps = _check_maps(maps)
    if tuple(masks.shape) != tuple(maps.shape):
        raise InputError(f"masks have shape {tuple(masks.shape)} but maps have {tuple(maps.shape)} (both [B, H, W])")
    masks = masks.to(device=maps.device, dtype=torch.bool)
    empty = ~masks.flatten(1).any(1)
    if empty.any():
        raise InputError(f"masks are empty for samples {empty.nonzero().flatten().tolist()}; "
                         "a localisation metric needs a non-empty ground-truth region")
    return maps, masks


def _dilate(masks: Tensor, tolerance: int) -> Tensor:
    """Masks grown by ``tolerance`` pixels in every direction (a (2t+1)² square max-pool)."""
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance == 0:
        return masks
    k = 2 * tolerance + 1
    return F.max_pool2d(masks.unsqueeze(1).float(), k, stride=1, padding=tolerance).squeeze(1) > 0


def _inside_ratio(maps: Tensor, masks: Tensor) -> Tensor:
    """Σ_{in mask} max(map, 0) / Σ max(map, 0) per sample; 0 where the map has no positive part."""
    positive = maps.clamp(min=0).flatten(1)
    total = positive.sum(1)
    inside = (positive * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.where(total > 0, torch.ones_like(total)), torch.zeros_like(total))


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Pointing game (Zhang et al., IJCV 2018, "Top-down neural attention by excitation backprop"). Higher ↑.

    ``1.0`` if the map's maximum lies in the mask dilated by ``tolerance`` pixels (Chebyshev distance: a
    (2t+1)² square; the paper uses 15 px), else ``0.0``. With tied maxima one of them inside is a hit; a constant
    map (e.g. all zeros) points nowhere and is a miss.
    """
    maps, masks = _check_masks(maps, masks)
    flat = maps.flatten(1)
    top = flat.amax(1, keepdim=True)
    at_max = flat == top
    hit = (at_max & _dilate(masks, tolerance).flatten(1)).any(1)
    constant = top.squeeze(1) == flat.amin(1)
    return (hit & ~constant).to(maps.dtype)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al., CVPRW 2020, Score-CAM). Higher ↑.

    ``Σ_{(i,j) ∈ mask} max(M_ij, 0) / Σ_{ij} max(M_ij, 0)``; 0 when the map has no positive part.
    """
    maps, masks = _check_masks(maps, masks)
    return _inside_ratio(maps, masks)


def attribution_localisation(maps: Tensor, masks: Tensor, weighted: bool = False) -> Tensor:
    """Attribution localisation (Kohlbrenner et al., IJCNN 2020, "Towards best practice in explaining neural
    network decisions with LRP"). Higher ↑.

    ``μ = R⁺_in / R⁺_tot``, the share of positive relevance inside the mask (as quantus's
    ``AttributionLocalisation(abs=False, positive_attributions=True)``; 0 for a map with no positive part).
    ``weighted=True`` gives the paper's size-corrected ``μ_w = μ · (H·W) / |mask|`` (1 for a uniform map).
    """
    maps, masks = _check_masks(maps, masks)
    ratio = _inside_ratio(maps, masks)
    if weighted:
        area = masks.flatten(1).sum(1).to(maps.dtype)
        ratio = ratio * (masks[0].numel() / area)
    return ratio


def box_iou(maps: Tensor, masks: Tensor, threshold: Literal["zero", "mean"] = "zero") -> Tensor:
    """IoU of the attributed region ``{M > t}`` with the mask (RSP, Nam et al. AAAI 2020, Table 1 mIoU). Higher ↑.

    ``IoU = |{M > t} ∩ mask| / |{M > t} ∪ mask|`` with ``t = 0`` (``"zero"``) or ``t`` = the mean of the map's
    positive values (``"mean"``; 0 for a map with no positive value).
    """
    maps, masks = _check_masks(maps, masks)
    if threshold == "zero":
        t = torch.zeros(maps.shape[0], dtype=maps.dtype, device=maps.device)
    elif threshold == "mean":
        flat = maps.flatten(1)
        count = (flat > 0).sum(1).clamp(min=1)
        t = flat.clamp(min=0).sum(1) / count
    else:
        raise InputError(f'threshold must be "zero" or "mean", got {threshold!r}')
    region = maps > t.view(-1, 1, 1)
    inter = (region & masks).flatten(1).sum(1)
    union = (region | masks).flatten(1).sum(1)
    return inter.to(maps.dtype) / union.to(maps.dtype)
