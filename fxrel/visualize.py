"""Relevance heatmaps in the LRP convention.

Relevance is summed over channels and normalised by ``max|R|`` into ``[-1, 1]``
(symmetric, so zero relevance renders white) and coloured with a diverging
colormap: red = positive (evidence for the class), blue = negative.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through
``pyplot``: no GUI backend is selected, no global state is touched and nothing
is displayed. Files are written atomically (temp file in the target directory,
then :func:`os.replace`), so a failed save never leaves a partial PNG behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from fxrel import outputs

__all__ = ["relevance_to_map", "heatmap_rgb", "overlay", "save_heatmap", "save_grid"]

_REDUCTIONS = ("sum", "abs_sum", "max_norm")
# Colormap lookup-table size: odd, so that relevance 0 (colormap position 0.5)
# hits the centre entry exactly and renders pure white with seismic/bwr.
_LUT_SIZE = 257
# A power-of-two dpi makes ``pixels / dpi * dpi`` exact in floating point, so
# pixel-exact figures do not lose a row/column to truncation in the Agg canvas.
_PIXEL_DPI = 128
_TITLE_HEIGHT = 24  # pixels of the title strip in save_heatmap
_GRID_CELL_INCHES = 2.0
_GRID_DPI = 100
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights

PathLike = str | os.PathLike[str]
ImageLike = torch.Tensor | np.ndarray


def relevance_to_map(relevance: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Reduce relevance over channels to a 2-D map per sample.

    Accepts ``[N, C, H, W]``, ``[C, H, W]`` or ``[H, W]`` (returned as is) and
    returns ``[N, H, W]`` or ``[H, W]`` in float32. ``reduce`` is ``"sum"``
    (signed, the LRP convention), ``"abs_sum"`` or ``"max_norm"`` (L2 norm over
    channels).
    """
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f"relevance must be a torch.Tensor, got {type(relevance).__name__}")
    if relevance.dim() not in (2, 3, 4):
        raise ValueError(
            "relevance must have shape [N, C, H, W], [C, H, W] or [H, W], "
            f"got shape {tuple(relevance.shape)}"
        )
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    r = relevance.detach().float()
    if torch.isnan(r).any():
        raise ValueError("relevance contains NaN values")
    if torch.isinf(r).any():
        raise ValueError("relevance contains infinite values")
    if r.dim() == 2:
        return r
    if reduce == "sum":
        return r.sum(dim=-3)
    if reduce == "abs_sum":
        return r.abs().sum(dim=-3)
    return torch.linalg.vector_norm(r, dim=-3)


def heatmap_rgb(map2d: torch.Tensor | np.ndarray, cmap: str = "seismic", gamma: float = 1.0) -> np.ndarray:
    """Colour a 2-D relevance map; returns ``uint8 [H, W, 3]``.

    The map is divided by ``max|R|`` (an all-zero map stays zero and renders
    white); ``gamma`` is applied to the magnitude, keeping the sign
    (``gamma < 1`` brightens weak relevance).
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    m = torch.as_tensor(map2d)
    if m.dim() != 2:
        raise ValueError(f"map2d must be 2-D [H, W], got shape {tuple(m.shape)}")
    m = relevance_to_map(m).cpu().numpy()
    peak = np.abs(m).max()
    if peak > 0:
        m = m / peak
    m = np.sign(m) * np.abs(m) ** gamma
    colours = matplotlib.colormaps[cmap].resampled(_LUT_SIZE)((m + 1.0) / 2.0)
    return np.round(colours[..., :3] * 255.0).astype(np.uint8)


def _image_to_float_hwc(image: ImageLike) -> np.ndarray:
    """Float tensor ``[3, H, W]`` in [0, 1] or uint8 ``[H, W, 3]`` → float ``[H, W, 3]`` in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must have shape [3, H, W], got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image tensor must be floating point in [0, 1], got {image.dtype}")
        img = image.detach().cpu().float()
        if img.min() < 0 or img.max() > 1:
            raise ValueError("image tensor values must lie in [0, 1] (was it ImageNet-normalised?)")
        return img.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image array must be uint8 [H, W, 3], got {image.dtype} with shape {image.shape}"
            )
        return image.astype(np.float32) / 255.0
    raise TypeError(f"image must be a torch.Tensor or numpy array, got {type(image).__name__}")


def _image_to_uint8(image: ImageLike) -> np.ndarray:
    return np.round(_image_to_float_hwc(image) * 255.0).astype(np.uint8)


def overlay(image: ImageLike, heat_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``heat_rgb`` over a grayscale version of ``image``; returns ``uint8 [H, W, 3]``.

    ``alpha`` is the heatmap weight: 0 gives the grayscale image, 1 the heatmap.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_to_float_hwc(image)
    if heat_rgb.shape != img.shape:
        raise ValueError(f"heatmap shape {heat_rgb.shape} does not match image shape {img.shape}")
    gray = (img @ np.asarray(_LUMA, dtype=np.float32))[..., None]
    blended = (1.0 - alpha) * gray + alpha * (heat_rgb.astype(np.float32) / 255.0)
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def _single_map(relevance: torch.Tensor) -> torch.Tensor:
    """Channel-summed 2-D map of one sample (a batch must hold exactly one)."""
    m = relevance_to_map(relevance)
    if m.dim() == 3:
        if m.shape[0] != 1:
            raise ValueError(f"expected a single relevance map, got a batch of {m.shape[0]}")
        m = m[0]
    return m


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then move it into place with the mode a plain ``open``
    would give (``0666 & ~umask``; ``mkstemp`` alone leaves 0600). A failure leaves nothing behind (see
    :mod:`fxrel.outputs`, which stages several files of one operation together)."""
    return outputs.atomic_write(path, write)


def save_heatmap(
    path: PathLike,
    relevance: torch.Tensor,
    image: ImageLike | None = None,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Write one relevance map as a pixel-exact PNG; returns the path.

    Without ``image`` the PNG is the ``H x W`` heatmap; with it, the image and
    the overlay side by side (``H x 2W``). A ``title`` adds a strip on top.
    """
    heat = heatmap_rgb(_single_map(relevance))
    if image is not None:
        img = _image_to_uint8(image)
        heat = np.concatenate([img, overlay(img, heat, alpha)], axis=1)
    if title is not None:
        strip = np.full((_TITLE_HEIGHT, heat.shape[1], 3), 255, dtype=np.uint8)
        heat = np.concatenate([strip, heat], axis=0)

    fig = Figure(dpi=_PIXEL_DPI)
    fig.figimage(heat, resize=True)
    if title is not None:
        centre_y = 1.0 - _TITLE_HEIGHT / 2 / heat.shape[0]
        fig.text(0.5, centre_y, title, ha="center", va="center", fontsize=9)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_PIXEL_DPI))


def save_grid(
    path: PathLike,
    rows: Sequence[str],
    cols: Sequence[str],
    maps: Sequence[Sequence[torch.Tensor]],
    images: Sequence[ImageLike] | None = None,
    overlay_alpha: float | None = None,
) -> Path:
    """Write a labelled ``len(rows) x len(cols)`` grid of heatmaps; returns the path.

    ``maps[i][j]`` is the relevance for row ``i``, column ``j`` (any shape
    :func:`relevance_to_map` accepts, one sample); each cell is normalised on
    its own. ``images`` (one per row) adds a leading "input" column; with
    ``overlay_alpha`` each heatmap is also blended over its row's image.
    """
    if not rows or not cols:
        raise ValueError("rows and cols must be non-empty")
    if len(maps) != len(rows) or any(len(row) != len(cols) for row in maps):
        raise ValueError(f"maps must be a {len(rows)} x {len(cols)} nested list matching rows x cols")
    if images is not None and len(images) != len(rows):
        raise ValueError(f"images must hold one image per row ({len(rows)}), got {len(images)}")

    cells = [[heatmap_rgb(_single_map(m)) for m in row] for row in maps]
    titles = list(cols)
    if images is not None and overlay_alpha is not None:
        cells = [[overlay(img, heat, overlay_alpha) for heat in row] for img, row in zip(images, cells)]
    if images is not None:
        cells = [[_image_to_uint8(img), *row] for img, row in zip(images, cells)]
        titles = ["input", *titles]

    n_rows, n_cols = len(cells), len(titles)
    fig = Figure(
        figsize=(n_cols * _GRID_CELL_INCHES, n_rows * _GRID_CELL_INCHES),
        dpi=_GRID_DPI,
        layout="constrained",
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            ax = axes[i, j]
            ax.imshow(cell, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(rows[i], fontsize=9)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_GRID_DPI))
