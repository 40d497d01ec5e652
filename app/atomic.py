"""Atomic, non-clobbering file writes for everything NodeTrainer writes (recipes, caches, models).

Standard library only, so the recipe code (no torch) and the data cache use it too.

A crash or a full disk in the middle of a save must never leave a half-written LoRA where the
last good one was, and a re-run must not silently replace last night's result: writes go to a
temporary file in the same folder and are moved into place with ``os.replace`` (atomic on one file
system); an existing target is kept unless ``overwrite=True``, the new file getting ``_1``, ``_2``...
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from dataclasses import dataclass


def available_path(path: "str | os.PathLike", overwrite: bool = False) -> Path:
    """``path`` itself if free (or ``overwrite``), else the first free ``<stem>_<n><suffix>``."""
    path = Path(path)
    if overwrite or not path.exists():
        return path
    n = 1
    while True:
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}") if path.suffix else path.with_name(f"{path.name}_{n}")
        if not candidate.exists():
            return candidate
        n += 1


@contextmanager
def atomic_file(path: "str | os.PathLike", overwrite: bool = False) -> Iterator[_Target]:
    """Yield ``(tmp, final)``: write ``tmp``; on success it is moved to ``final``."""
    target = available_path(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield _Target(tmp_path, target)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Target:
    """``tmp``: where to write now; ``final``: where the result will be (may carry a ``_n`` suffix)."""

    tmp: Path
    final: Path


@contextmanager
def atomic_folder(path: "str | os.PathLike", overwrite: bool = False) -> Iterator[_Target]:
    """Like ``atomic_file`` for a folder: built beside the target, swapped in when complete."""
    target = available_path(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent)))
    try:
        yield _Target(tmp, target)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=str(target.parent)))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
