"""Which classes of each image a dataset run explains: ``label`` (the dataset's label), ``top1`` / ``top-k`` (the k
highest-scoring classes, highest first) or ``present`` (every class of a multi-label vector; an int label is a
one-class set)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from fxrel.errors import InputError

__all__ = ["TargetSpec", "parse_target", "image_classes"]


@dataclass(frozen=True)
class TargetSpec:
    """A parsed target: ``kind`` is ``"label"``, ``"top"`` (with ``k``) or ``"present"``."""

    kind: str
    k: int = 1

    def __str__(self) -> str:
        if self.kind != "top":
            return self.kind
        return "top1" if self.k == 1 else f"top-{self.k}"

    @property
    def needs_labels(self) -> bool:
        """Whether the dataset's labels pick the classes (``label``, ``present``)."""
        return self.kind in ("label", "present")


def parse_target(text: str | TargetSpec) -> TargetSpec:
    """``label``, ``top1``, ``top-k`` / ``topk`` or ``present`` → a :class:`TargetSpec`."""
    if isinstance(text, TargetSpec):
        return text
    token = str(text).strip().lower()
    top = re.fullmatch(r"top-?(\d+)", token)
    if token in ("label", "present"):
        return TargetSpec(token)
    if top and int(top.group(1)) > 0:
        return TargetSpec("top", int(top.group(1)))
    raise InputError(f"target '{text}' not understood; use 'label' (the dataset's label), 'top1', 'top-k' (the k "
                     "highest-scoring classes) or 'present' (every class of a multi-label vector)")


def image_classes(spec: TargetSpec, labels: Sequence, scores: torch.Tensor | None, classes: int,
                  ids: Sequence[str]) -> list[list[int]]:
    """The classes to explain per image of a batch: ``labels`` as :func:`fxrel.datasets.sources.normalise_label`
    gives them, ``scores`` the model's ``[N, classes]`` output (needed for ``top-k`` only), ``classes`` the model's
    class count, ``ids`` the images' ids (for error messages)."""
    if spec.kind == "top":
        if scores is None:
            raise ValueError("target top-k needs the model's scores")
        if spec.k > classes:
            raise InputError(f"target top-{spec.k} asks for more classes than the model has ({classes})")
        return scores.topk(spec.k, dim=-1).indices.tolist()
    out = []
    for label, image in zip(labels, ids):
        if label is None:
            raise InputError(f"target '{spec}' needs labels, and image {image} has none; use 'top1' or 'top-k'")
        if spec.kind == "label" and isinstance(label, list):
            raise InputError(f"target 'label' needs one class per image, and image {image} has a label vector "
                             f"(classes {label}); use 'present' to explain every class it holds")
        chosen = [label] if isinstance(label, int) else label
        bad = [c for c in chosen if not 0 <= c < classes]
        if bad:
            raise InputError(f"image {image}: label {bad[0]} is not a class of the model (0 … {classes - 1})")
        out.append(chosen)
    return out
