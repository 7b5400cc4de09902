"""Demo inputs: a deterministic synthetic image, image loading and ImageNet normalisation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "synthetic_image", "imagenet_normalize", "load_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MIN_SIZE = 16


def _uniform(gen: torch.Generator, low: float, high: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _paint(img: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, colour.view(3, 1, 1), img)


def synthetic_image(size: int = 224, seed: int = 0) -> torch.Tensor:
    """Deterministic demo image: float ``[3, size, size]`` in [0, 1].

    A textured background (smooth colour noise plus a gradient) with two discs,
    two rectangles and a striped patch. Uses a seeded ``torch.Generator`` only,
    so the global RNG is untouched and the result depends on ``seed`` alone.
    """
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}, got {size}")
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    coarse = torch.rand((1, 3, 8, 8), generator=gen)
    texture = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    grain = 0.08 * torch.rand((3, size, size), generator=gen)
    base = _uniform(gen, 0.2, 0.6, (3, 1, 1))
    img = base + 0.3 * texture * (0.5 + 0.5 * yy) + grain

    for _ in range(2):
        cy, cx = _uniform(gen, 0.2, 0.8, (2,))
        radius = _uniform(gen, 0.08, 0.18)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        img = _paint(img, disc, torch.rand(3, generator=gen))

    for _ in range(2):
        y0, x0 = _uniform(gen, 0.05, 0.6, (2,))
        h, w = _uniform(gen, 0.12, 0.35, (2,))
        rect = (yy >= y0) & (yy <= y0 + h) & (xx >= x0) & (xx <= x0 + w)
        img = _paint(img, rect, torch.rand(3, generator=gen))

    y0, x0 = _uniform(gen, 0.1, 0.6, (2,))
    patch = (yy >= y0) & (yy <= y0 + 0.3) & (xx >= x0) & (xx <= x0 + 0.3)
    angle = _uniform(gen, 0.0, math.pi)
    phase = 2 * math.pi * 12 * (xx * torch.cos(angle) + yy * torch.sin(angle))
    stripes = patch & (torch.sin(phase) > 0)
    img = _paint(img, stripes, torch.rand(3, generator=gen))

    return img.clamp(0.0, 1.0)


def imagenet_normalize(img: torch.Tensor) -> torch.Tensor:
    """Normalise ``[3, H, W]`` or ``[N, 3, H, W]`` images in [0, 1] with ImageNet mean/std."""
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"expected an image of shape [3, H, W] or [N, 3, H, W], got {tuple(img.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - mean) / std


def load_image(path: str | os.PathLike[str], size: int) -> torch.Tensor:
    """Load an image as RGB float ``[3, size, size]`` in [0, 1].

    The shorter side is resized to ``size`` (bicubic), then the centre is
    cropped. Raises ``FileNotFoundError`` for a missing file and ``ValueError``
    for a file PIL cannot decode.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc

    width, height = rgb.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
