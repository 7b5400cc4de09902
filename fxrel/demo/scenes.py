"""Deterministic multi-digit scenes with ground truth (labels, stroke masks, boxes).

Digits come from scikit-learn's bundled 8×8 handwritten digits (1797 images, no network). They are split once,
per class, into a fixed 75 % "train" and 25 % "test" part; scenes of a split draw only from its part. Each scene
is a cluttered background (smooth colour gradient, low-contrast blobs, thin line segments, pixel noise) with 1–3
digits of distinct classes, each upscaled (bilinear) to 18–28 px at 64 px (scaled with ``size``), given a bright
colour and alpha-composited with its intensity. The digits' supports (alpha > 0) never overlap, so every mask is
the digit's own, unoccluded stroke pixels. All randomness comes from one seeded ``torch.Generator``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "MASK_THRESHOLD", "SceneBatch", "make_scenes", "split_indices",
           "digit_source"]

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
NUM_CLASSES = len(CLASS_NAMES)
MASK_THRESHOLD = 0.3  # a digit pixel belongs to the mask when its intensity (alpha) exceeds this
SPLITS = ("train", "test")
_TRAIN_FRACTION = 0.75
_SPLIT_SEED = 0
_MAX_DIGITS = 3
_TRIES = 48  # candidate positions per digit; a digit that fits nowhere is left out
_LINES = 6
_BLOBS = 4
_MIN_SIZE = 32
_CHUNK = 256  # scenes rendered at once


@dataclass(frozen=True, eq=False)
class SceneBatch:
    """A batch of scenes. ``images`` float32 [n, 3, H, W] in [0, 1]; ``labels`` bool [n, 10] (classes present);
    ``masks`` bool [n, 10, H, W] (each class's stroke pixels); ``boxes`` int64 [n, 10, 4] (x0, y0, x1, y1 of the
    mask, exclusive ends, -1 for absent classes); ``sources`` int64 [n, 10] (index of the digit image in
    ``sklearn.datasets.load_digits()``, -1 for absent classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    sources: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | slice | torch.Tensor) -> SceneBatch:
        """Index the batch dimension; an int gives a batch of one."""
        if isinstance(index, int):
            index = slice(index, index + 1 or None)
        return SceneBatch(*(t[index] for t in self._fields()))

    def to(self, device: torch.device | str) -> SceneBatch:
        return SceneBatch(*(t.to(device) for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.labels, self.masks, self.boxes, self.sources


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as float32 [1797, 8, 8] intensities in [0, 1] and int64 [1797] classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
    """Sorted indices (into ``load_digits()``) of the digit images a split draws from; the splits are disjoint
    and cover all 1797 images, 75 % / 25 % of every class."""
    _check_split(split)
    _, target = _digits()
    rng = np.random.RandomState(_SPLIT_SEED)
    parts = []
    for c in range(NUM_CLASSES):
        perm = rng.permutation(np.flatnonzero(target == c))
        cut = round(_TRAIN_FRACTION * len(perm))
        parts.append(perm[:cut] if split == "train" else perm[cut:])
    out = np.sort(np.concatenate(parts))
    out.flags.writeable = False
    return out


def digit_source(index: int) -> tuple[np.ndarray, int]:
    """The 8×8 intensity image in [0, 1] and class of digit ``index`` of ``load_digits()``."""
    images, target = _digits()
    return images[index], int(target[index])


@functools.lru_cache(maxsize=None)
def _bank(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All digits upscaled (bilinear) to ``side``×``side`` [1797, side, side]; each one's support box (alpha > 0)
    and mask box (alpha > MASK_THRESHOLD), both as (y0, y1, x0, x1) with exclusive ends."""
    images, _ = _digits()
    up = F.interpolate(torch.from_numpy(images)[:, None], size=(side, side), mode="bilinear", align_corners=False)
    up = up[:, 0].clamp(0.0, 1.0).numpy()
    return up, _tight_boxes(up > 0), _tight_boxes(up > MASK_THRESHOLD)


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(y0, y1, x0, x1) of each non-empty mask in a [m, h, w] stack."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    return np.stack([rows.argmax(1), h - rows[:, ::-1].argmax(1), cols.argmax(1), w - cols[:, ::-1].argmax(1)], 1)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1, np.uint64)[0] >> 1)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV → RGB (all inputs in [0, 1]); the channels are the last dimension."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6.0 * h[..., None]) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def _background(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Cluttered, muted backgrounds [n, 3, size, size]: gradient + blobs + line segments + noise (not clamped).
    All random draws come first, so the rendering (chunked, to stay in cache) does not change them."""
    scale = size / 64.0
    coarse = 0.08 + 0.45 * torch.rand(n, 3, 3, 3, generator=gen)
    centre = size * torch.rand(n, _BLOBS, 2, generator=gen)
    sigma = scale * (3.0 + 7.0 * torch.rand(n, _BLOBS, 1, generator=gen))
    amp = 0.3 * torch.rand(n, _BLOBS, 3, generator=gen) - 0.15
    start = size * (1.4 * torch.rand(n, _LINES, 2, generator=gen) - 0.2)
    angle = 2 * torch.pi * torch.rand(n, _LINES, generator=gen)
    length = scale * (10.0 + 40.0 * torch.rand(n, _LINES, generator=gen))
    colour = torch.rand(n, _LINES, 3, generator=gen)
    drawn = torch.rand(n, _LINES, generator=gen) < 0.7  # about 70 % of the line slots are drawn
    alpha = (0.35 + 0.5 * torch.rand(n, _LINES, generator=gen)) * drawn
    img = 0.06 * torch.rand(n, 3, size, size, generator=gen) - 0.03
    direction = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)

    pix = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = pix.view(1, size, 1), pix.view(1, 1, size)
    for first in range(0, n, _CHUNK):
        part = slice(first, first + _CHUNK)
        out = img[part]
        out += F.interpolate(coarse[part], size=(size, size), mode="bicubic", align_corners=True)
        gy = torch.exp(-0.5 * ((pix - centre[part, :, :1]) / sigma[part]) ** 2)
        gx = torch.exp(-0.5 * ((pix - centre[part, :, 1:]) / sigma[part]) ** 2)
        out += torch.einsum("nbc,nbh,nbw->nchw", amp[part], gy, gx)
        for line in range(_LINES):
            (y0, x0), (dy, dx) = start[part, line].T[..., None, None], direction[part, line].T[..., None, None]
            t = ((yy - y0) * dy + (xx - x0) * dx).clamp_(min=0.0).clamp_(max=length[part, line, None, None])
            dist = torch.hypot(yy - y0 - t * dy, xx - x0 - t * dx)
            a = (1.0 - dist / scale).clamp_(min=0.0).mul_(alpha[part, line, None, None])[:, None]
            out += a * (colour[part, line, :, None, None] - out)
    return img


def _place(h: np.ndarray, w: np.ndarray, present: np.ndarray, tries: np.ndarray,
           size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left corners (y, x) [n, k] for footprints ``h``×``w`` [n, k] so that no two overlap: each slot takes
    the first of its candidate positions ``tries`` [n, k, T, 2] (in [0, 1)²) that is free; ``placed`` [n, k]
    is False for absent slots and for those that fit nowhere."""
    cy = (tries[..., 0] * (size - h + 1)[..., None]).astype(np.int64)
    cx = (tries[..., 1] * (size - w + 1)[..., None]).astype(np.int64)
    y, x = np.zeros_like(h), np.zeros_like(w)
    placed = np.zeros(h.shape, bool)
    rows = np.arange(len(h))
    for k in range(h.shape[1]):
        free = np.repeat(present[:, k, None], tries.shape[2], axis=1)
        for j in range(k):
            apart = ((cy[:, k] + h[:, k, None] <= y[:, j, None]) | (y[:, j, None] + h[:, j, None] <= cy[:, k])
                     | (cx[:, k] + w[:, k, None] <= x[:, j, None]) | (x[:, j, None] + w[:, j, None] <= cx[:, k]))
            free &= apart | ~placed[:, j, None]
        first = free.argmax(axis=1)
        placed[:, k] = free.any(axis=1)
        y[:, k], x[:, k] = cy[rows, k, first], cx[rows, k, first]
    return y, x, placed


def make_scenes(n: int = 16, seed: int = 0, split: str = "test", size: int = 64) -> SceneBatch:
    """``n`` scenes of ``size``×``size`` pixels from ``split`` ("train" or "test"); the same arguments always give
    identical tensors. See the module docstring for what a scene contains."""
    _check_split(split)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}, got {size}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    gen = torch.Generator().manual_seed(_split_seed(seed, split))
    _, target = _digits()
    pool = split_indices(split)
    lo, hi = round(18 * size / 64), round(28 * size / 64)

    count = torch.randint(1, _MAX_DIGITS + 1, (n, 1), generator=gen).numpy()
    classes = torch.rand(n, NUM_CLASSES, generator=gen).argsort(dim=1)[:, :_MAX_DIGITS].numpy()
    pick = torch.rand(n, _MAX_DIGITS, generator=gen, dtype=torch.float64).numpy()
    sides = torch.randint(lo, hi + 1, (n, _MAX_DIGITS), generator=gen).numpy()
    hsv = torch.rand(3, n, _MAX_DIGITS, generator=gen) * torch.tensor([1.0, 0.45, 0.15]).view(3, 1, 1)
    colours = _hsv_to_rgb(hsv[0], 0.55 + hsv[1], 0.85 + hsv[2]).numpy()
    tries = torch.rand(n, _MAX_DIGITS, _TRIES, 2, generator=gen).numpy()
    images = _background(n, size, gen)

    per_class = [pool[target[pool] == c] for c in range(NUM_CLASSES)]
    sizes = np.array([len(p) for p in per_class])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    by_class = np.concatenate(per_class)
    digits = by_class[starts[classes] + (pick * sizes[classes]).astype(np.int64)]
    support = np.zeros((n, _MAX_DIGITS, 4), np.int64)
    inner = np.zeros((n, _MAX_DIGITS, 4), np.int64)
    for side in np.unique(sides):
        same = sides == side
        _, support[same], inner[same] = (b[digits[same]] for b in _bank(int(side)))
    y, x, placed = _place(support[..., 1] - support[..., 0], support[..., 3] - support[..., 2],
                          np.arange(_MAX_DIGITS) < count, tries, size)

    alpha = np.zeros((n, size, size), np.float32)
    paint = np.zeros((n, size, size, 3), np.float32)
    masks = np.zeros((n, NUM_CLASSES, size, size), bool)
    boxes = np.full((n, NUM_CLASSES, 4), -1, np.int64)
    sources = np.full((n, NUM_CLASSES), -1, np.int64)
    mask_offset = inner - support[..., [0, 0, 2, 2]]
    box_xy = np.stack([x + mask_offset[..., 2], y + mask_offset[..., 0], x + mask_offset[..., 3],
                       y + mask_offset[..., 1]], axis=-1)
    at = np.nonzero(placed)
    boxes[at[0], classes[at]] = box_xy[at]
    sources[at[0], classes[at]] = digits[at]
    for i, c, side, d, (sy0, sy1, sx0, sx1), y0, x0, colour in zip(
            *(v.tolist() for v in (at[0], classes[at], sides[at], digits[at], support[at], y[at], x[at])),
            colours[at]):
        crop = _bank(side)[0][d, sy0:sy1, sx0:sx1]
        window = (slice(y0, y0 + sy1 - sy0), slice(x0, x0 + sx1 - sx0))
        alpha[i][window] = crop
        paint[i][window] = crop[..., None] * colour
        masks[i, c][window] = crop > MASK_THRESHOLD

    a = torch.from_numpy(alpha)[:, None]
    images = (images * (1.0 - a) + torch.from_numpy(paint).permute(0, 3, 1, 2)).clamp_(0.0, 1.0).contiguous()
    masks_t = torch.from_numpy(masks)
    return SceneBatch(images, masks_t.flatten(2).any(2), masks_t, torch.from_numpy(boxes), torch.from_numpy(sources))
