"""Small batched image operations shared by the wrappers and the metrics (no kornia / OpenCV dependency)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxrel.errors import InputError


def gaussian_kernel1d(kernel_size: int, sigma: float, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian ``g_i ∝ exp(−(i − (k−1)/2)² / 2σ²)``, ``i = 0…k−1`` (kornia's kernel)."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma!r}")
    offsets = torch.arange(kernel_size, dtype=dtype, device=device) - (kernel_size - 1) / 2
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float, border: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` (or ``[N, H, W]``) tensors, each channel on its own; ``border``
    is an ``F.pad`` mode (``"reflect"`` as kornia's default, ``"replicate"``, ``"constant"``)."""
    squeeze = images.dim() == 3
    x = images.unsqueeze(1) if squeeze else images
    if x.dim() != 4:
        raise InputError(f"gaussian_blur expects [N, C, H, W] or [N, H, W], got shape {tuple(images.shape)}")
    channels = x.shape[1]
    g = gaussian_kernel1d(kernel_size, sigma, dtype=x.dtype, device=x.device)
    r = kernel_size // 2
    if border == "reflect" and min(x.shape[-2:]) <= r:
        border = "replicate"  # reflect padding needs more pixels than the radius
    x = F.pad(x, (r, r, r, r), mode=border)
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)
    return x.squeeze(1) if squeeze else x


def minmax_normalise(maps: torch.Tensor, constant: float = 0.0) -> torch.Tensor:
    """Per-sample ``(m − min) / (max − min)`` over all but the batch axis; a constant map becomes ``constant``."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    span = (flat.max(dim=1).values.view_as(low) - low)
    return torch.where(span > 0, (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny),
                       torch.full_like(maps, constant))


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``[N, H, W]`` maps resized to ``size`` (``F.interpolate``, ``align_corners=False`` for the smooth modes)."""
    align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=mode, align_corners=align).squeeze(1)
