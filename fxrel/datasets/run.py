"""Explain a whole dataset: batched, resumable, sharded over processes, the maps stored for reuse.

:func:`explain_dataset` reads the images (:mod:`fxrel.datasets.sources`) with a ``DataLoader`` (``workers``
processes, pinned memory on CUDA), explains the classes the target names (:mod:`fxrel.datasets.targets`) with each
method (:func:`fxrel.evaluation.method_fn`: maps ``[H, W]``, the channel sum at the input's size) and writes the maps
in shard files of ``shard_size`` images (:mod:`fxrel.datasets.layout`, :mod:`fxrel.datasets.shards`); rank 0 then
writes ``index.jsonl`` (:mod:`fxrel.datasets.index`), which :class:`fxrel.datasets.MapStore` reads.

* One batch shape: every image is fitted to ``size``, and the (image, class) rows go to the methods ``batch_size``
  at a time, a short last chunk padded by repeating its last row (the padding is dropped), so one relevance program
  per method serves the whole run. Random methods (SmoothGrad) draw per (image, class) (:mod:`fxrel.streams`), so a
  map does not depend on its batch.
* Resumable: a shard file is written only whole, and a run restarted in the same folder keeps the shard files
  already there and redoes the rest; a folder written with other options (model weights, methods, size, dtype,
  target, shard size, process count, dataset, fxrel version) is refused.
* Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` of ``w`` explains images ``r, r + w, …`` on
  ``cuda:LOCAL_RANK`` (CUDA) or the CPU, writes its own shard files, and after a barrier (gloo on CPU, nccl on
  CUDA) rank 0 writes the index.
* Memory stays flat: a process holds the maps of one shard at a time.

Precision of the default float16 store, measured against a float32 store of the same run (demo-vgg, 2,000
generated test scenes at 64 px, target ``label``, ``benchmarks/bench_explain_dataset.py --dtypes``): the largest
error of a map relative to its own peak |value| is 4.8e-4 for epsilon_plus_flat and grad_cam alike (float16's
rounding, 2⁻¹¹ of the peak), and the Spearman rank correlation of each float16 map with its float32 map is ≥ 0.9999
(grad_cam's lowest of 2,000: 0.99990; epsilon_plus_flat's: 1.000000 to six places). bfloat16: 3.9e-3 and ≥ 0.99997.
float16 ends at 65504: a map beyond it is an error naming the image (store it as bfloat16 or float32 then).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fxrel import visualize
from fxrel.datasets.index import build_index, expected_shards, write_index
from fxrel.datasets.layout import (
    DTYPES,
    FORMAT,
    PNG_FOLDER,
    RUN_FILE,
    check_same_run,
    identity_hash,
    model_hash,
    rank_shards,
    shard_name,
)
from fxrel.datasets.methods import MapRunner, map_runner
from fxrel.datasets.shards import read_header, remove_temps, write_durably, write_shard
from fxrel.datasets.sources import FittedDataset, ImageFiles, collate, image_files
from fxrel.datasets.targets import TargetSpec, image_classes, parse_target
from fxrel.errors import InputError, NumericalError
from fxrel.imageops import resize_maps
from fxrel.text import split_specs
from fxrel.version import __version__

__all__ = ["explain_dataset", "DatasetRun"]

#: how long a rank waits at the final barrier for the others (a resumed rank may have all the work left)
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass
class DatasetRun:
    """What one process of :func:`explain_dataset` did."""

    folder: Path
    images: int              #: images in the dataset
    rows: int                #: (image, class) rows this process wrote (each with one map per method)
    shards_written: int
    shards_kept: int         #: shard files of an earlier run of the same options, kept
    seconds: float
    rank: int = 0
    world: int = 1
    index: Path | None = None   #: index.jsonl (rank 0)
    source: str = ""            #: what the images came from
    images_done: int = 0        #: images this process explained (kept shards not counted)
    maps: int = 0               #: maps in the index (rank 0): (image, class) rows × methods
    shard_files: int = 0        #: shard files of every rank (rank 0)

    @property
    def images_per_second(self) -> float:
        """Images this process explained per second (kept shards not counted)."""
        return self.images_done / self.seconds if self.seconds > 0 else float("nan")


def _methods(methods: str | Sequence[str]) -> list[str]:
    specs = split_specs(methods) if isinstance(methods, str) else [s.strip() for s in methods]
    if not specs or not all(specs):
        raise InputError(f"methods must name at least one method spec (name or name[key=value,…]), got {methods!r}")
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise InputError(f"method spec {repeated[0]} is given twice")
    for spec in specs:
        map_runner(spec)   # an unknown method or parameter is an InputError naming it
    return specs


def _dtype(dtype: str | torch.dtype) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _describe(dataset: Dataset) -> tuple[list[str], list[str | None], list[str | None], str, str]:
    """Ids, paths, label names per image, the source's kind and a line describing it."""
    if isinstance(dataset, ImageFiles):
        names = [dataset.classes[y] if dataset.classes and y is not None else None for y in dataset.labels]
        return dataset.ids, [str(p) for p in dataset.paths], names, dataset.layout, dataset.describe()
    count = len(dataset)
    return ([str(i) for i in range(count)], [None] * count, [None] * count, "dataset",
            f"{type(dataset).__name__}, {count} images")


def _open(source: str | os.PathLike[str] | Dataset, size: int) -> Dataset:
    if isinstance(source, (str, os.PathLike)):
        dataset = image_files(source, size)
    elif isinstance(source, Dataset) or hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        dataset = source
    else:
        raise InputError(f"source must be an image folder, a list file or a torch Dataset, got {type(source).__name__}")
    if len(dataset) == 0:
        raise InputError("the dataset is empty")
    return dataset


def _device(device: torch.device | str, world: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device cuda requested but CUDA is not available")
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return device


def _slug(text: str) -> str:
    """``text`` (an image id or method spec) as a relative path: odd characters replaced, no ``..`` or root."""
    parts = [re.sub(r"[^A-Za-z0-9_.=-]+", "_", p) for p in Path(text).parts if p not in ("/", "..")]
    return "/".join(p for p in parts if p.strip("._")) or "image"


class _Shard:
    """The rows of one shard being explained."""

    def __init__(self, methods: int, shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.maps: list[list[torch.Tensor]] = [[] for _ in range(methods)]
        self.image: list[int] = []
        self.cls: list[int] = []
        self.score: list[float] = []
        self.images: list[dict[str, Any]] = []


def explain_dataset(model: nn.Module, source: str | os.PathLike[str] | Dataset, out: str | os.PathLike[str],
                    methods: str | Sequence[str], *, target: str | TargetSpec = "top1", size: int = 224,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 16,
                    shard_size: int = 256, dtype: str | torch.dtype = "float16", workers: int = 0,
                    device: torch.device | str = "cpu", model_name: str | None = None, png: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    on_shard: Callable[[Path], None] | None = None) -> DatasetRun:
    """Explain every image of ``source`` (an image folder, a list file or a ``Dataset`` of ``(image, label)``;
    :mod:`fxrel.datasets.sources`) with ``methods`` (specs, ``name[key=value,…]``, a list or a comma-separated
    string) for ``target`` (``label``, ``top1``, ``top-k``, ``present``) and store the maps in the folder ``out``
    (see the module docstring). ``transform`` maps a batch of fitted images to the model's input (e.g.
    :func:`fxrel.sample_images.imagenet_normalize`); ``png`` also writes ``png/m<i>-<method>/<image id>.c<class>.png``
    (image | overlay). ``progress(done, total)`` is called with this process's images after every batch (first with
    those of kept shards); ``on_shard(path)`` after every shard file written. Returns what this process did."""
    start = time.perf_counter()
    specs, spec = _methods(methods), parse_target(target)
    dtype_name, size = _dtype(dtype), _positive("size", size)
    batch_size, shard_size = _positive("batch_size", batch_size), _positive("shard_size", shard_size)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers must be a non-negative integer, got {workers!r}")
    dataset = _open(source, size)
    ids, paths, label_names, kind, described = _describe(dataset)
    fitted = FittedDataset(dataset, size)
    _, probe, label = fitted[0]   # a bad item or a target the labels cannot serve fails before any work
    if spec.needs_labels and label is None:
        raise InputError(f"target '{spec}' needs labels, and {described.split(',')[0]} has none; use 'top1' or "
                         "'top-k'")
    if spec.kind == "label" and isinstance(label, list):
        raise InputError("target 'label' needs one class per image, and the dataset gives label vectors; use "
                         "'present' to explain every class of an image")

    rank, world = _world()
    own_group = world > 1 and not dist.is_initialized()
    device = _device(device, world)
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        model = model.eval().to(device)
        with torch.no_grad():
            scores = model((transform or (lambda t: t))(probe[None].to(device)))
        if scores.dim() != 2:
            raise InputError(f"the model's output has shape {tuple(scores.shape)}; a dataset run explains "
                             "classifiers with [batch, classes] scores")
        _check_classes(spec, dataset, ids, scores.shape[1])
        folder = Path(out)
        run = {"format": FORMAT, "fxrel_version": __version__, "model": model_name or type(model).__name__,
               "model_hash": model_hash(model), "methods": specs, "size": size, "dtype": dtype_name,
               "target": str(spec), "shard_size": shard_size, "world_size": world,
               "dataset": {"kind": kind, "images": len(dataset), "ids_hash": _ids_hash(ids)},
               "source": described, "image_shape": list(probe.shape)}
        _claim_folder(folder, run, rank)
        stamp = identity_hash(run)
        shards = rank_shards(len(dataset), rank, world, shard_size)
        pending = [(s, images) for s, images in enumerate(shards) if not _done(folder, rank, s, images, stamp)]
        total = sum(map(len, shards))
        kept = total - sum(len(images) for _, images in pending)
        if progress is not None:
            progress(kept, total)
        plan = [(s, images[i:i + batch_size]) for s, images in pending for i in range(0, len(images), batch_size)]
        loader = DataLoader(fitted, batch_sampler=[batch for _, batch in plan], num_workers=workers,
                            collate_fn=collate, pin_memory=device.type == "cuda")
        context = _Context(model, [map_runner(s) for s in specs], specs, spec, scores.shape[1], transform,
                           batch_size, DTYPES[dtype_name], device, ids, paths, label_names, folder if png else None)
        done, rows, written = kept, 0, 0
        current: _Shard | None = None
        for (s, _), (indices, images, labels) in zip(plan, loader):
            if current is None:
                current = _Shard(len(specs), (size, size), DTYPES[dtype_name])
            context.explain(current, indices, images, labels)
            done += len(indices)
            if progress is not None:
                progress(done, total)
            if indices[-1] == shards[s][-1]:   # the shard's last batch: write it whole
                path = _write(folder, rank, s, current, stamp)
                rows, written, current = rows + len(current.image), written + 1, None
                if on_shard is not None:
                    on_shard(path)
        index, records, files = None, [], 0
        if world > 1 and device.type == "cuda":   # wait until every rank's shards are written
            dist.barrier(device_ids=[device.index])
        elif world > 1:
            dist.barrier()
        if rank == 0:
            records = build_index(folder, run)
            index, files = write_index(folder, records), len(expected_shards(run))
        return DatasetRun(folder, len(dataset), rows, written, len(shards) - len(pending),
                          time.perf_counter() - start, rank, world, index, described, done - kept, len(records),
                          files)
    finally:
        if own_group:
            dist.destroy_process_group()


def _check_classes(spec: TargetSpec, dataset: Dataset, ids: list[str], classes: int) -> None:
    """Check the target against the model's class count before any work: top-k's k, and the labels of image files
    (a dataset's labels are checked as they are read)."""
    if spec.kind == "top":
        image_classes(spec, [None], torch.zeros(1, classes), classes, ids[:1])
    elif isinstance(dataset, ImageFiles):
        image_classes(spec, dataset.labels, None, classes, ids)


def _ids_hash(ids: list[str]) -> str:
    return hashlib.blake2b("\n".join(ids).encode(), digest_size=12).hexdigest()


def _claim_folder(folder: Path, run: dict[str, Any], rank: int) -> None:
    """Check ``folder`` against the run already in it (or that it has none, and no stray shards); rank 0 records
    this run there; stale temp files of this rank are removed."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output folder {folder} is a file; give a folder")
    manifest = folder / RUN_FILE
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{manifest} is not a run file of fxrel; give another output folder") from None
        check_same_run(folder, old, run)
    else:
        strays = [p.name for p in folder.glob("maps-*.safetensors")] if folder.is_dir() else []
        if strays:
            raise InputError(f"{folder} holds shard files ({strays[0]}, …) but no {RUN_FILE}; their options are "
                             "unknown, so give another output folder")
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            write_durably(manifest, (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())
    folder.mkdir(parents=True, exist_ok=True)
    remove_temps(folder, (f"maps-{rank:05d}-",) + ((f"{RUN_FILE}.", "index.jsonl.") if rank == 0 else ()))


def _done(folder: Path, rank: int, shard: int, images: list[int], stamp: str) -> bool:
    """Whether the shard file is there, complete, from this run; one from another run is an error."""
    path = folder / shard_name(rank, shard)
    if not path.is_file():
        return False
    header = read_header(path)
    if header is None:   # cannot be read: redone
        return False
    if header.get("run") != stamp or [e["image"] for e in header.get("images", [])] != images:
        raise InputError(f"shard file {path} was written by another run (its options differ from {RUN_FILE}'s); "
                         "give another output folder")
    return True


def _write(folder: Path, rank: int, shard: int, rows: _Shard, stamp: str) -> Path:
    tensors = {f"maps.{m}": torch.cat(maps) if maps else torch.empty((0, *rows.shape), dtype=rows.dtype)
               for m, maps in enumerate(rows.maps)}
    tensors.update({"image": torch.tensor(rows.image, dtype=torch.int64),
                    "class": torch.tensor(rows.cls, dtype=torch.int64),
                    "score": torch.tensor(rows.score, dtype=torch.float32)})
    name = shard_name(rank, shard)
    header = {"run": stamp, "rank": rank, "shard": shard, "images": rows.images}
    return write_shard(folder / name, tensors, header)


@dataclass
class _Context:
    """What explaining one batch needs."""

    model: nn.Module
    runners: list[MapRunner]
    specs: list[str]
    target: TargetSpec
    classes: int
    transform: Callable | None
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    ids: list[str]
    paths: list[str | None]
    label_names: list[str | None]
    png: Path | None

    def explain(self, shard: _Shard, indices: list[int], images: torch.Tensor, labels: list) -> None:
        """Explain one batch of images into ``shard``."""
        x = images.to(self.device, non_blocking=True)
        model_x = self.transform(x) if self.transform is not None else x
        scores = self._forward(model_x) if self.target.kind == "top" else None
        classes = image_classes(self.target, labels, scores, self.classes, [self.ids[i] for i in indices])
        pairs = [(j, c) for j, chosen in enumerate(classes) for c in chosen]
        for j, i in enumerate(indices):
            shard.images.append({"image": i, "id": self.ids[i], "path": self.paths[i], "label": labels[j],
                                 "label_name": self.label_names[i]})
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            padded = chunk + chunk[-1:] * (self.batch_size - len(chunk))
            rows = torch.tensor([j for j, _ in padded], device=self.device)
            targets = torch.tensor([c for _, c in padded], device=self.device)
            keys = [(indices[j], c) for j, c in padded]
            real = torch.arange(len(chunk), device=self.device)
            chunk_scores = None if scores is None else scores[rows[:len(chunk)], targets[:len(chunk)]]
            for m, runner in enumerate(self.runners):
                maps, output = runner(self.model, model_x[rows], targets, keys)
                if chunk_scores is None and output is not None and output.dim() == 2:
                    chunk_scores = output[real, targets[:len(chunk)]]
                maps = maps.detach()
                if maps.shape[-2:] != x.shape[-2:]:
                    maps = resize_maps(maps, x.shape[-2:])
                stored = maps[:len(chunk)].to("cpu", self.dtype)
                self._check(stored, maps[:len(chunk)], m, [indices[j] for j, _ in chunk])
                shard.maps[m].append(stored)
                if self.png is not None:
                    self._png(m, stored, [(indices[j], c, x[j]) for j, c in chunk])
            if chunk_scores is None:   # only wrappers ran: they return no output
                chunk_scores = self._forward(model_x[rows[:len(chunk)]])[real, targets[:len(chunk)]]
            shard.image += [indices[j] for j, _ in chunk]
            shard.cls += [c for _, c in chunk]
            shard.score += chunk_scores.detach().float().cpu().tolist()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def _check(self, stored: torch.Tensor, maps: torch.Tensor, m: int, images: list[int]) -> None:
        bad = ~torch.isfinite(stored.flatten(1)).all(1)
        if bad.any():
            k = int(bad.nonzero()[0])
            peak = float(maps[k].abs().max())
            raise NumericalError(f"method {self.specs[m]}: the map of image {self.ids[images[k]]} is not finite in "
                                 f"{self.dtype} (largest magnitude {peak:.4g}); store it as float32 (or bfloat16)")

    def _png(self, m: int, maps: torch.Tensor, rows: list[tuple[int, int, torch.Tensor]]) -> None:
        folder = self.png / PNG_FOLDER / f"m{m}-{_slug(self.specs[m])}"
        for value, (i, c, image) in zip(maps, rows):
            path = folder / f"{_slug(self.ids[i])}.c{c}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = image.detach().float().cpu()
            in_range = image.dim() == 3 and image.shape[0] == 3 and 0 <= float(image.min()) <= float(image.max()) <= 1
            visualize.save_heatmap(path, value.float(), image=image if in_range else None)
