"""The output folder of a dataset run: file names, which images go to which shard file, and the run's identity.

A folder holds ``run.json`` (the run's options: model and the hash of its state dict, method specs, size, dtype,
target, shard size, process count, dataset, fxrel version), the shard files ``maps-RRRRR-SSSSS.safetensors`` (rank
R's S-th shard of ``shard_size`` images) and, once every shard is written, ``index.jsonl``. Rank ``r`` of ``w``
takes images ``r, r + w, r + 2w, …`` (``DistributedSampler(shuffle=False)`` without its padding), in shards of
consecutive ones of them.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxrel.errors import InputError

__all__ = ["FORMAT", "RUN_FILE", "INDEX_FILE", "PNG_FOLDER", "shard_name", "shard_pattern", "rank_shards",
           "model_hash", "identity_hash", "check_same_run", "DTYPES"]

FORMAT = "fxrel-maps/1"
RUN_FILE = "run.json"
INDEX_FILE = "index.jsonl"
PNG_FOLDER = "png"
#: the storage dtypes by name
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: the ``run.json`` fields that must agree for a run to continue in a folder (the rest is information)
IDENTITY = ("format", "fxrel_version", "model", "model_hash", "methods", "size", "dtype", "target", "shard_size",
            "world_size", "dataset")

_SHARD = re.compile(r"maps-(\d{5})-(\d{5})\.safetensors")


def shard_name(rank: int, shard: int) -> str:
    """``maps-RRRRR-SSSSS.safetensors``."""
    return f"maps-{rank:05d}-{shard:05d}.safetensors"


def shard_pattern() -> re.Pattern:
    """The pattern of shard file names (groups: rank, shard)."""
    return _SHARD


def rank_shards(count: int, rank: int, world: int, shard_size: int) -> list[list[int]]:
    """The image indices of each of rank ``rank``'s shards, in order."""
    mine = list(range(rank, count, world))
    return [mine[start:start + shard_size] for start in range(0, len(mine), shard_size)]


def model_hash(model: nn.Module) -> str:
    """BLAKE2b (128 bits, hex) of the model's state dict: every entry's name, dtype, shape and bytes, by name."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identity_hash(run: dict[str, Any]) -> str:
    """A short hash of the identity fields of a ``run.json`` (stamped in every shard file)."""
    text = json.dumps({k: run.get(k) for k in IDENTITY}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def check_same_run(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Raise :class:`InputError` naming every option in which ``new`` differs from the run ``old`` already in
    ``folder``."""
    differ = [key for key in IDENTITY if old.get(key) != new.get(key)]
    if differ:
        shown = "; ".join(f"{key}: folder has {json.dumps(old.get(key))}, this run {json.dumps(new.get(key))}"
                          for key in differ)
        raise InputError(f"{folder} holds the maps of another run ({shown}); a run continues only with the same "
                         "options, so give another output folder (or delete this one to start over)")
