"""Keyed random streams: every random draw of a row comes from a generator of its own, seeded by a hash of
``(seed, name, key)``, so a row's draws do not depend on the batch it lands in, its position there, the chunking,
the process count or the device.

``key`` names the row: the evaluation passes ``(image index, class)``; a caller without ids gets the row's position
in the batch (``0 … B−1``, the batch-dependent behaviour of a single generator, but keyed). ``name`` names the
consumer (``"faithfulness_correlation"``, ``"max_sensitivity"``, ``"smoothgrad"`` …), so two metrics never share a
stream. The generators are CPU ``torch.Generator``s (the same numbers on every device); the draws are then moved to
the device they are used on. The seed is the first 8 bytes of BLAKE2b of the key's ``repr`` (stable across processes
and machines, unlike Python's salted ``hash``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import torch

from fxrel.errors import InputError

Key = Hashable   #: an int, a string or a tuple of them (anything whose ``repr`` is stable)


def stream_seed(seed: int, name: str, key: Key) -> int:
    """The 63-bit seed of the stream ``(seed, name, key)``."""
    digest = hashlib.blake2b(repr((int(seed), str(name), key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def row_keys(keys: Sequence[Key] | torch.Tensor | None, rows: int) -> list[Key]:
    """The checked key of each of ``rows`` rows: ``keys`` as Python values (a tensor's rows as tuples or ints), or the
    row positions ``0 … rows−1`` when ``keys`` is ``None``."""
    if keys is None:
        return list(range(rows))
    if isinstance(keys, torch.Tensor):
        keys = [tuple(k) if isinstance(k, list) else k for k in keys.tolist()]
    keys = [tuple(k) if isinstance(k, list) else k for k in keys]
    if len(keys) != rows:
        raise InputError(f"keys must name each of the {rows} rows, got {len(keys)} keys")
    return keys


def row_generators(seed: int, name: str, keys: Sequence[Key] | torch.Tensor | None,
                   rows: int) -> list[torch.Generator]:
    """One CPU generator per row, seeded with :func:`stream_seed` of its key (see :func:`row_keys`)."""
    return [torch.Generator().manual_seed(stream_seed(seed, name, k)) for k in row_keys(keys, rows)]


def draw_rows(generators: Sequence[torch.Generator], shape: Sequence[int], *, normal: bool = False,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """``[len(generators), *shape]``: row ``i`` the next ``torch.rand`` (``normal``: ``torch.randn``) draw of
    ``shape`` from generator ``i``, on ``device``."""
    sample = torch.randn if normal else torch.rand
    rows = [sample(tuple(shape), generator=g, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device) if rows else torch.empty(0, *shape, dtype=dtype, device=device)
