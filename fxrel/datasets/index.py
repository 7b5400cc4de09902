"""The index of a finished dataset run, ``index.jsonl``: one JSON line per (image, class, method) map, saying where
it is (shard file, tensor, row) and what it is (image index, id, path, label, explained class, the model's score for
it, method spec and parameters, model and the hash of its state dict, fxrel version), ordered by image, then class
as the target gave them, then method."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from fxrel.datasets.layout import INDEX_FILE, rank_shards, shard_name
from fxrel.datasets.shards import read_header, write_durably
from fxrel.errors import InputError
from fxrel.text import parse_spec

__all__ = ["expected_shards", "missing_shards", "build_index", "write_index", "read_index"]


def expected_shards(run: dict[str, Any]) -> list[str]:
    """The names of every shard file of ``run``, rank by rank."""
    count, world = run["dataset"]["images"], run["world_size"]
    return [shard_name(rank, s) for rank in range(world)
            for s, _ in enumerate(rank_shards(count, rank, world, run["shard_size"]))]


def missing_shards(folder: Path, run: dict[str, Any]) -> list[str]:
    """The shard files of ``run`` not (yet) in ``folder``."""
    return [name for name in expected_shards(run) if not (folder / name).is_file()]


def build_index(folder: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The index records of every shard of ``run`` in ``folder`` (all must be there)."""
    missing = missing_shards(folder, run)
    if missing:
        raise InputError(f"{folder} lacks {len(missing)} shard file(s) ({', '.join(missing[:3])}, …); the run is not "
                         "finished: run the same command again to complete it")
    methods = [(spec, *parse_spec(spec)) for spec in run["methods"]]
    common = {"target": run["target"], "model": run["model"], "model_hash": run["model_hash"],
              "fxrel_version": run["fxrel_version"]}
    rows: list[tuple[int, int, int, dict[str, Any]]] = []
    for name in expected_shards(run):
        header = read_header(folder / name)
        if header is None:
            raise InputError(f"shard file {folder / name} cannot be read; delete it and run again to redo it")
        images = {entry["image"]: entry for entry in header["images"]}
        with safe_open(str(folder / name), framework="pt") as file:
            image, cls, score = (file.get_tensor(k).tolist() for k in ("image", "class", "score"))
        seen: dict[int, int] = {}
        for row, (i, c, s) in enumerate(zip(image, cls, score)):
            order = seen[i] = seen.get(i, -1) + 1
            info = images[i]
            for m, (spec, method_name, params) in enumerate(methods):
                rows.append((i, order, m, {
                    "image": i, "id": info["id"], "path": info["path"], "label": info["label"],
                    "label_name": info.get("label_name"), "class": c, "score": s, "method": spec,
                    "method_name": method_name, "params": params, **common,
                    "shard": name, "tensor": f"maps.{m}", "row": row}))
    rows.sort(key=lambda r: r[:3])
    return [record for *_, record in rows]


def write_index(folder: Path, records: list[dict[str, Any]]) -> Path:
    """Write ``index.jsonl`` durably (see :mod:`fxrel.datasets.shards`)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return write_durably(folder / INDEX_FILE, text.encode("utf-8"))


def read_index(folder: Path) -> list[dict[str, Any]]:
    """The records of ``folder``'s ``index.jsonl``."""
    with open(folder / INDEX_FILE, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
