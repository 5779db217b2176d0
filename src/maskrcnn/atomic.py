"""Files that appear complete or not at all: temp file (or folder) in the target's directory, fsync, rename.

Every file a command writes goes through here. A process killed midway leaves the previous version untouched and,
at worst, a hidden temporary beside it (``.<name>.<random>.tmp`` or ``.<name>.<random>.tmpdir``), which
:func:`remove_stale_temp` deletes on the next start. Only the standard library is imported (torch lazily by
:func:`atomic_save`), so every layer of the package may use this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_dir", "atomic_save", "atomic_write", "atomic_write_json", "atomic_write_text", "fsync_dir",
           "remove_stale_temp"]

# The names this module gives its temporaries; nothing else matches, so cleaning up never touches user files.
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")
_TEMP_DIR = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmpdir$")


def fsync_dir(directory: str | Path) -> None:
    """Make renames in ``directory`` durable (best effort: not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, binary: bool, write: Callable[[IO[Any]], None]) -> Path:
    """Run ``write`` on a temp file in the target's directory, fsync, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, False, lambda f: f.write(text))


def atomic_write_json(path: str | Path, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(obj, **dump_kwargs)`` to ``path`` atomically."""
    return atomic_write(path, False, lambda f: json.dump(obj, f, **dump_kwargs))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch  # noqa: PLC0415 - only this writer needs it

    return atomic_write(path, True, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; when the block ends without error it becomes ``path``.

    Its files are fsynced and the folder renamed into place, so ``path`` never holds a partial set of files.
    An existing ``path`` is renamed aside first and deleted after (two renames: a crash between them leaves
    the new folder under its temp name and the old one under another, both removed by
    :func:`remove_stale_temp`, and no ``path``: the caller writes it again).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
            os.replace(path, old)  # onto an empty folder: allowed, and atomic
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temp(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temporaries this module leaves when a process is killed mid-write; returns what went.

    Only names of this module's pattern (``.<name>.<random>.tmp`` / ``.tmpdir``) are touched. Call it when no
    other process writes into ``directory`` (training: rank 0 at start).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    entries = directory.rglob(".*") if recursive else directory.glob(".*")
    for p in sorted(entries):
        if _TEMP_FILE.match(p.name) and (p.is_file() or p.is_symlink()):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
        elif _TEMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
