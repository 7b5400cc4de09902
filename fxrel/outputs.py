"""All-or-nothing output files: every file one operation writes is staged as a temp file in its destination folder
and all are moved into place together when the operation succeeds::

    out = staged_outputs()
    heat, plan = out.claim("heat.png"), out.claim("heat.plan.txt")   # before any work: a clash fails here
    with out:
        ...                                  # the work that can fail
        render_png(out.stage(heat))          # write to the staged temp file
        out.write_text(plan, text)
    # here both files are in place; on any exception (KeyboardInterrupt too) neither is, no temp file remains,
    # folders made for them are removed again and files that were already there are untouched

Moving several files into place cannot be one atomic step; :meth:`OutputSet.commit` keeps a hard link (or copy)
of each file it replaces until all moves are done, and puts the old files back if one move fails.

This module sits in the lowest layer: it imports nothing from fxrel but :mod:`fxrel.errors`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from fxrel.errors import FxrelError

__all__ = ["OutputError", "OutputSet", "staged_outputs", "atomic_write"]

PathLike = str | os.PathLike[str]


class OutputError(FxrelError, ValueError):
    """Two outputs of one operation are the same file, or an output's path is taken by a folder."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _key(path: Path) -> str:
    """The file ``path`` names, for clash checks: the folder with its links resolved, the name as given (a link at
    the destination is itself replaced, so two links to one file are two outputs)."""
    return os.path.normcase(os.path.join(os.path.realpath(path.parent), path.name))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class OutputSet:
    """The output files of one operation; see :func:`staged_outputs`."""

    def __init__(self) -> None:
        self._claimed: dict[str, tuple[Path, str]] = {}   # key → (path as given, what it is)
        self._staged: dict[Path, Path] = {}               # final path → its temp file
        self._made_dirs: list[Path] = []                  # folders created for the outputs, outermost first
        self._done = False

    def claim(self, path: PathLike, what: str = "output") -> Path:
        """Register an output before any work is done; raises :class:`OutputError` if another output of this set
        is the same file or a folder is in its place. Returns ``Path(path)``."""
        final = Path(path)
        key = _key(final)
        if key in self._claimed:
            other, other_what = self._claimed[key]
            raise OutputError(f"{what} {final} is the same file as {other_what} {other}; give each output its own "
                              "path")
        if final.is_dir():
            raise OutputError(f"{what} {final} is a folder; give a file path")
        self._claimed[key] = (final, what)
        return final

    def stage(self, path: PathLike) -> Path:
        """A fresh temp file next to ``path`` (its folder made if needed) for the caller to write ``path``'s
        content to; it becomes ``path`` on :meth:`commit`. ``path`` is claimed here if it was not before."""
        if self._done:
            raise RuntimeError("this OutputSet is already committed or discarded")
        final = Path(path)
        key = _key(final)
        if key not in self._claimed:
            self.claim(final)
        elif any(_key(p) == key for p in self._staged):
            raise OutputError(f"output {final} is written twice")
        self._make_dirs(final.parent)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self._staged[final] = Path(tmp)
        os.close(fd)
        return Path(tmp)

    def write(self, path: PathLike, write: Callable[[str], object]) -> Path:
        """Stage ``path`` and call ``write(temp path as str)`` to fill it; returns ``Path(path)``."""
        write(str(self.stage(path)))
        return Path(path)

    def write_text(self, path: PathLike, text: str) -> Path:
        """Stage ``path`` with ``text`` (UTF-8, ending in a newline); returns ``Path(path)``."""
        body = text if text.endswith("\n") else text + "\n"
        return self.write(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))

    @property
    def paths(self) -> list[Path]:
        """The staged outputs' final paths, in staging order."""
        return list(self._staged)

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
                self._made_dirs.append(d)

    @staticmethod
    def _backup(final: Path, backup: Path) -> None:
        """A second name, ``backup``, for the file at ``final`` that survives its replacement."""
        if final.is_symlink():
            os.symlink(os.readlink(final), backup)
            return
        try:
            os.link(final, backup)
        except OSError:   # no hard links on this file system: a copy
            shutil.copy2(final, backup)

    def commit(self) -> list[Path]:
        """Move every staged file into place (mode ``0666 & ~umask``, as a plain ``open`` gives); returns the final
        paths. If a move fails, the files moved so far are undone, the old files restored and the error raised."""
        if self._done:
            raise RuntimeError("this OutputSet is already committed or discarded")
        mode = 0o666 & ~_umask()
        moved: list[tuple[Path, Path | None]] = []
        backups: list[Path] = []
        try:
            for final, tmp in self._staged.items():
                os.chmod(tmp, mode)
                backup = None
                if os.path.lexists(final):
                    backup = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.bak")
                    backups.append(backup)
                    self._backup(final, backup)
                os.replace(tmp, final)
                moved.append((final, backup))
        except BaseException:
            for final, backup in reversed(moved):
                with contextlib.suppress(OSError):
                    if backup is None:
                        _unlink(final)
                    else:
                        os.replace(backup, final)
            self.discard()
            for backup in backups:
                with contextlib.suppress(OSError):
                    _unlink(backup)
            raise
        self._done = True
        for backup in backups:
            with contextlib.suppress(OSError):
                _unlink(backup)
        return list(self._staged)

    def discard(self) -> None:
        """Remove every staged temp file and the folders made for them (when empty); nothing at the destinations
        changes."""
        self._done = True
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                _unlink(tmp)
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def staged_outputs() -> OutputSet:
    """A fresh :class:`OutputSet`; as a context manager (``with staged_outputs() as out:``) it is committed when the
    block ends normally and discarded when it raises (any exception, ``KeyboardInterrupt`` included). Outputs may be
    claimed before the block, so that a clash fails before any work: ``out = staged_outputs(); out.claim(…);
    with out: …``."""
    return OutputSet()


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Write one file atomically: ``write(tmp)`` on a temp file next to ``path``, then moved into place. A failure
    leaves nothing behind and an existing file at ``path`` untouched."""
    with staged_outputs() as outputs:
        outputs.write(path, write)
    return Path(path)
