"""Reading the maps of a finished dataset run back: :class:`MapStore` opens the folder's ``run.json`` and
``index.jsonl`` and loads the maps of one image, one class or one method (or any combination) from only the shard
files that hold them, row by row (``safetensors.safe_open``: nothing else is read).

>>> store = MapStore("out/maps")
>>> found = store.load(image="cat/001.png", method="lrp_epsilon")   # found.maps [K, H, W], found.records
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from fxrel.datasets.index import missing_shards, read_index
from fxrel.datasets.layout import INDEX_FILE, RUN_FILE
from fxrel.errors import InputError
from fxrel.text import parse_spec

__all__ = ["MapStore", "Maps"]


@dataclass
class Maps:
    """Maps loaded from a :class:`MapStore`: ``maps[k]`` (``[K, H, W]``) is the map of ``records[k]``."""

    records: list[dict[str, Any]]
    maps: torch.Tensor

    def __len__(self) -> int:
        return len(self.records)


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[range, list[int]]]:
    """``(row, place)`` pairs grouped into runs of consecutive rows (one read each), with the places they go to."""
    runs: list[tuple[range, list[int]]] = []
    for row, place in sorted(pairs):
        if runs and runs[-1][0].stop == row:
            runs[-1] = (range(runs[-1][0].start, row + 1), runs[-1][1] + [place])
        else:
            runs.append((range(row, row + 1), [place]))
    return runs


class MapStore:
    """The maps of a finished ``explain_dataset`` run in ``folder``; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not (self.folder / RUN_FILE).is_file():
            raise InputError(f"{self.folder} is not the output folder of a dataset run (no {RUN_FILE})")
        self.run: dict[str, Any] = json.loads((self.folder / RUN_FILE).read_text(encoding="utf-8"))
        if not (self.folder / INDEX_FILE).is_file():
            missing = len(missing_shards(self.folder, self.run))
            raise InputError(f"{self.folder} has no {INDEX_FILE}: its run is not finished ({missing} shard file(s) "
                             "missing); run the same command again to complete it")
        self.records: list[dict[str, Any]] = read_index(self.folder)
        self._ids = {r["id"]: r["image"] for r in self.records}

    @property
    def methods(self) -> list[str]:
        """The method specs of the run, in order."""
        return list(self.run["methods"])

    @property
    def size(self) -> int:
        """The maps' side length in pixels."""
        return int(self.run["size"])

    def __len__(self) -> int:
        """The number of stored maps ((image, class, method) triples)."""
        return len(self.records)

    def _method(self, method: str) -> str:
        if method in self.run["methods"]:
            return method
        named = [spec for spec in self.run["methods"] if parse_spec(spec)[0] == method]
        if len(named) == 1:
            return named[0]
        what = f"several ({', '.join(named)}); give one in full" if named else "none"
        raise InputError(f"method '{method}' matches {what}; this run stored {', '.join(self.run['methods'])}")

    def _image(self, image: int | str) -> int:
        if isinstance(image, str):
            if image not in self._ids:
                raise InputError(f"no image with id '{image}' in {self.folder} (ids are as in the index, e.g. "
                                 f"'{self.records[0]['id'] if self.records else '—'}')")
            return self._ids[image]
        count = self.run["dataset"]["images"]
        if not isinstance(image, int) or not 0 <= image < count:
            raise InputError(f"image must be an id or an index in 0 … {count - 1}, got {image!r}")
        return image

    def select(self, image: int | str | None = None, cls: int | None = None, method: str | None = None
               ) -> list[dict[str, Any]]:
        """The index records of the maps of ``image`` (index or id), class ``cls`` and ``method`` (a stored spec,
        or a method name that only one stored spec has); ``None`` selects all."""
        index = None if image is None else self._image(image)
        spec = None if method is None else self._method(method)
        return [r for r in self.records if (index is None or r["image"] == index)
                and (cls is None or r["class"] == cls) and (spec is None or r["method"] == spec)]

    def map_fn(self, method: str, tolerance: float = 1e-4) -> Callable[..., torch.Tensor]:
        """The stored maps of ``method`` as a map function ``(model, x, targets, keys) → [N, H, W]``, ``keys`` the
        rows' ``(image index, class)`` (what :func:`fxrel.evaluation.evaluate` passes). Each map's recorded score is
        checked against ``model(x)`` (``|Δ| ≤ tolerance · (1 + |score|)``), so maps of other images or another
        model are refused, naming the image."""
        spec = self._method(method)
        where = {(r["image"], r["class"]): r for r in self.records if r["method"] == spec}

        def stored(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, keys=None) -> torch.Tensor:
            if keys is None or len(keys) != len(x):
                raise InputError("stored maps are looked up by (image, class) keys, one per row")
            missing = [key for key in keys if tuple(key) not in where]
            if missing:
                raise InputError(f"{self.folder} holds no {spec} map for (image, class) {tuple(missing[0])}")
            with torch.no_grad():
                scores = model(x).gather(1, torch.as_tensor(targets, device=x.device).view(-1, 1))[:, 0].cpu()
            recorded = torch.tensor([where[tuple(key)]["score"] for key in keys], dtype=scores.dtype)
            bad = ((scores - recorded).abs() > tolerance * (1 + recorded.abs())).nonzero().flatten()
            if len(bad):
                k = int(bad[0])
                raise InputError(f"the stored map of (image, class) {tuple(keys[k])} in {self.folder} was made for "
                                 f"a score of {float(recorded[k]):.5g}, but the model gives {float(scores[k]):.5g} "
                                 "on this image: other images or another model")
            maps = [self.load(image=int(i), cls=int(c), method=spec).maps[0] for i, c in keys]
            return torch.stack(maps).to(x.device)
        return stored

    def load(self, image: int | str | None = None, cls: int | None = None, method: str | None = None,
             dtype: torch.dtype | None = torch.float32) -> Maps:
        """The maps :meth:`select` names, read from only the shard files that hold them (``dtype=None``: as stored)."""
        records = self.select(image, cls, method)
        wanted: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
        for k, record in enumerate(records):
            wanted[(record["shard"], record["tensor"])].append((record["row"], k))
        size = self.size
        out: torch.Tensor | None = None
        by_shard: dict[str, list[str]] = defaultdict(list)
        for shard, tensor in wanted:
            by_shard[shard].append(tensor)
        for shard, tensors in by_shard.items():
            with safe_open(str(self.folder / shard), framework="pt") as file:
                for tensor in tensors:
                    part = file.get_slice(tensor)
                    for rows, places in _runs(wanted[(shard, tensor)]):
                        block = part[rows.start:rows.stop]
                        if out is None:
                            out = torch.empty((len(records), *block.shape[1:]), dtype=dtype or block.dtype)
                        out[places] = block.to(out.dtype)
        if out is None:
            stored = getattr(torch, self.run["dtype"])
            out = torch.empty((0, size, size), dtype=dtype or stored)
        return Maps(records, out)
