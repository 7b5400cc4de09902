"""Where the images of :func:`fxrel.datasets.explain_dataset` come from, each fitted to one size.

* an image folder: the torchvision ``ImageFolder`` layout (one subfolder per class, each image's label the index of
  its subfolder in sorted order) or a flat folder of images (no labels);
* a list file: one image path per line (relative to the file's folder), optionally followed by an integer label
  (tab or space separated; all lines or none), ``#`` comments and blank lines skipped;
* any ``torch.utils.data.Dataset`` whose items are ``(image, label)``: the image a ``[C, H, W]`` float tensor or a
  PIL image, the label an int, a multi-hot label vector (bool or 0/1, the classes present) or ``None``.

Files are read by :func:`fxrel.sample_images.load_image` (RGB in [0, 1], shorter side resized bicubically to
``size``, centre crop); a dataset's tensors of another size are resized (bilinear, antialiased) and centre-cropped
the same way, so that every batch has one shape.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fxrel.errors import InputError
from fxrel.sample_images import load_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "image_files", "fit_image", "normalise_label", "FittedDataset",
           "collate"]

#: the file endings read as images (torchvision's ``IMG_EXTENSIONS``), case-insensitive
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: an item's label after :func:`normalise_label`: a class, the classes present, or none
Label = int | list[int] | None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


class ImageFiles(Dataset):
    """Image files with their ids and optional labels; ``files[i]`` is ``(image [3, size, size], label or None)``."""

    def __init__(self, paths: Sequence[Path], ids: Sequence[str], labels: Sequence[int | None], size: int,
                 layout: str, where: str, classes: Sequence[str] = ()) -> None:
        if size < 1:
            raise InputError(f"size must be a positive number of pixels, got {size}")
        self.paths, self.ids, self.labels = list(paths), list(ids), list(labels)
        self.size, self.classes = size, tuple(classes)
        self.layout = layout   #: "imagefolder", "flat" or "list"
        self.where = where     #: the folder or list file

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | None]:
        try:
            return load_image(self.paths[index], self.size), self.labels[index]
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"image {self.ids[index]}: {exc}") from None

    def describe(self) -> str:
        """One line: what the source is and how many images it has."""
        kind = {"imagefolder": "image folder {} (ImageFolder layout, {} classes)", "flat": "image folder {} (flat)",
                "list": "list file {}"}[self.layout].format(self.where, len(self.classes))
        return f"{kind}, {len(self)} images"


def _folder(root: Path, size: int) -> ImageFiles:
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in subfolders}
    top = sorted(p for p in root.iterdir() if _is_image(p))
    if any(per_class.values()):
        if top:
            raise InputError(f"image folder {root} has images both at its top level ({top[0].name}, …) and in "
                             f"class subfolders; use one layout: ImageFolder (one subfolder per class) or a flat "
                             "folder of images")
        empty = [name for name, files in per_class.items() if not files]
        if empty:   # torchvision's ImageFolder refuses them too: a class index would shift
            raise InputError(f"class folder {root / empty[0]} holds no images; in the ImageFolder layout every "
                             "subfolder is a class (remove it, or move it out of the folder)")
        paths = [p for files in per_class.values() for p in files]
        labels = [k for k, files in enumerate(per_class.values()) for _ in files]
        return ImageFiles(paths, [p.relative_to(root).as_posix() for p in paths], labels, size,
                          "imagefolder", str(root), list(per_class))
    if top:
        return ImageFiles(top, [p.name for p in top], [None] * len(top), size, "flat", str(root))
    raise InputError(f"image folder {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files at its "
                     "top level and in its subfolders)")


def _list_file(path: Path, size: int) -> ImageFiles:
    paths, ids, labels = [], [], []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, None
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].strip().lstrip("+-").isdigit():
            name, label = parts[0].strip(), int(parts[1])
        if labels and (label is None) != (labels[0] is None):
            raise InputError(f"list file {path} line {number}: '{line}' {'has no' if label is None else 'has a'} "
                             "label, unlike the lines before it; give a label on every line or on none")
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        if not file.is_file():
            raise InputError(f"list file {path} line {number}: image not found: {file}")
        paths.append(file)
        ids.append(name)
        labels.append(label)
    if not paths:
        raise InputError(f"list file {path} names no images (one path per line, optionally followed by a label)")
    return ImageFiles(paths, ids, labels, size, "list", str(path))


def image_files(source: str | os.PathLike[str], size: int) -> ImageFiles:
    """The images of an image folder or a list file (see the module docstring), read at ``size`` pixels."""
    path = Path(source)
    if path.is_dir():
        return _folder(path, size)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise InputError(f"{path} is an image; give a folder of images or a list file (one path per line)")
        return _list_file(path, size)
    raise InputError(f"image source not found: {path} (give an image folder or a list file)")


def fit_image(image: Any, size: int, where: str = "image") -> torch.Tensor:
    """``image`` (a ``[C, H, W]`` float tensor or a PIL image) as a float ``[C, size, size]`` tensor: shorter side
    resized to ``size`` (bilinear, antialiased), centre crop; a tensor of that size already is returned as is."""
    if not isinstance(image, torch.Tensor):
        try:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except AttributeError:
            raise InputError(f"{where} must be a [C, H, W] tensor or a PIL image, got {type(image).__name__}") from None
        image = torch.from_numpy(array).permute(2, 0, 1)
    if image.dim() != 3 or not image.is_floating_point():
        raise InputError(f"{where} must be a float tensor shaped [C, H, W], got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(image[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return resized[:, top:top + size, left:left + size].contiguous()


def normalise_label(label: Any, where: str = "label") -> Label:
    """An item's label as an int (one class), a sorted list of ints (the nonzero entries of a label vector, the
    classes present) or ``None``."""
    if label is None:
        return None
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    tensor = torch.as_tensor(np.asarray(label)) if not isinstance(label, torch.Tensor) else label
    if tensor.dim() == 0 and not tensor.is_floating_point() and tensor.dtype != torch.bool:
        return int(tensor)
    if tensor.dim() == 1 and (tensor.dtype == torch.bool or bool(((tensor == 0) | (tensor == 1)).all())):
        return tensor.nonzero().flatten().tolist()
    raise InputError(f"{where} must be a class index, a multi-hot label vector (0/1 or bool per class) or None, got "
                     f"{type(label).__name__} {getattr(label, 'shape', label)}")


@dataclass
class FittedDataset(Dataset):
    """``dataset``'s items as ``(index, image [C, size, size], label)`` (:func:`fit_image`, :func:`normalise_label`),
    what the run's ``DataLoader`` reads."""

    dataset: Dataset
    size: int

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, Label]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"dataset item {index} must be a pair (image, label), got {type(item).__name__}")
        image, label = item
        return (index, fit_image(image, self.size, f"dataset item {index}'s image"),
                normalise_label(label, f"dataset item {index}'s label"))


def collate(items: list[tuple[int, torch.Tensor, Label]]) -> tuple[list[int], torch.Tensor, list[Label]]:
    """A batch of :class:`FittedDataset` items: indices, stacked images, labels as given."""
    return [i for i, _, _ in items], torch.stack([x for _, x, _ in items]), [y for _, _, y in items]
