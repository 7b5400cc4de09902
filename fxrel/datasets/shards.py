"""Writing a dataset run's files so that none is ever half-written, and reading a shard's header.

Every file is written to a temp file ``.NAME.*.tmp`` in its folder (:func:`fxrel.outputs.atomic_write`), flushed to
disk (``fsync``), renamed into place (``os.replace``) and the folder's entry synced: a killed run leaves complete
files and, at worst, temp files, which the next run removes (:func:`remove_temps`).

A shard file holds, for ``R`` (image, class) rows, ``maps.M`` ``[R, H, W]`` per method ``M`` (the index into the
run's methods), ``image`` and ``class`` (int64 ``[R]``) and ``score`` (float32 ``[R]``, the model's output for the
class), and in its metadata (``fxrel``, JSON) the run's identity hash and each image's index, id, path and label.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from fxrel.outputs import atomic_write

__all__ = ["write_durably", "write_shard", "read_header", "remove_temps"]


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):   # not every file system lets a folder be opened and synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_durably(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``: temp file in its folder, ``fsync``, ``os.replace``, folder synced."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    atomic_write(path, write)
    _sync_folder(path.parent)
    return path


def write_shard(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write one shard file (see the module docstring) with ``header`` as its ``fxrel`` metadata."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"fxrel": json.dumps(header)})
    return write_durably(path, data)


def read_header(path: Path) -> dict[str, Any] | None:
    """The ``fxrel`` metadata of a shard file, or ``None`` when it cannot be read as one."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return json.loads((file.metadata() or {})["fxrel"])
    except Exception:  # not a safetensors file, no fxrel metadata, bad JSON: not a shard of ours
        return None


def remove_temps(folder: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """Remove the temp files ``.PREFIX*.tmp`` an interrupted run left in ``folder``; returns them."""
    removed = []
    for path in folder.glob(".*.tmp"):
        if path.name[1:].startswith(prefixes):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
