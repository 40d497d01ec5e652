"""Atomic, non-clobbering file writes for everything NodeTrainer writes (recipes, caches, models).

Standard library only, so the recipe code (no torch) and the data cache use it too.

A crash or a full disk in the middle of a save must never leave a half-written LoRA where the
last good one was, and a re-run must not silently replace last night's result: writes go to a
temporary file in the same folder and are moved into place with ``os.replace`` (atomic on one file
system); an existing target is kept unless ``overwrite=True``, the new file getting ``_1``, ``_2``...

Temporary files and folders are named ``.nodetrainer-tmp-<name>.XXXXXXXX.tmp`` (``TMP_PREFIX``), so what a killed
run leaves behind is recognisable and the next run in that workspace removes it (see
``app/engine/workspace.py``). They get the user's umask before they are moved into place:
``mkstemp`` creates them 0600, which would keep a LoRA unreadable by a ComfyUI service running as
another user. A failed write removes its temporary file and raises ``WriteError`` naming the file
and the cause ("no space left on device while writing ...: 1.2 GB needed").
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".nodetrainer-tmp-"
_NAME_IN_TMP = 60  # characters of the target's name kept in a temp name (names stay under 255)


class WriteError(OSError):
    """Writing a file failed; the message names the file and the cause, and no partial file remains."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


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


@dataclass(frozen=True)
class _Target:
    """``tmp``: where to write now; ``final``: where the result will be (may carry a ``_n`` suffix)."""

    tmp: Path
    final: Path


@contextmanager
def atomic_file(path: "str | os.PathLike", overwrite: bool = False, *, size_hint: int | None = None) -> Iterator[_Target]:
    """Yield ``(tmp, final)``: write ``tmp``; on success it is moved to ``final``.

    ``size_hint``: about how many bytes the file takes, for the message when the disk is full."""
    target = available_path(path, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(target.name), suffix=".tmp", dir=str(target.parent))
        os.close(fd)
    except OSError as e:
        raise write_error(e, target, size_hint) from None
    tmp_path = Path(tmp)
    try:
        yield _Target(tmp_path, target)
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, target)
    except BaseException as e:
        converted = write_error(e, target, size_hint) if is_write_failure(e) else None
        tmp_path.unlink(missing_ok=True)
        if converted is not None:
            raise converted from None
        raise


@contextmanager
def atomic_folder(path: "str | os.PathLike", overwrite: bool = False, *, size_hint: int | None = None) -> Iterator[_Target]:
    """Like ``atomic_file`` for a folder: built beside the target, swapped in when complete."""
    target = available_path(path, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(target.name), suffix=".tmp", dir=str(target.parent)))
    except OSError as e:
        raise write_error(e, target, size_hint) from None
    try:
        yield _Target(tmp, target)
        os.chmod(tmp, 0o777 & ~umask())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=tmp_prefix(target.name + ".old"), dir=str(target.parent)))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        converted = write_error(e, target, size_hint) if is_write_failure(e) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if converted is not None:
            raise converted from None
        raise


def tmp_prefix(name: str) -> str:
    return f"{TMP_PREFIX}{name[:_NAME_IN_TMP]}."


# ---- the umask -----------------------------------------------------------------------------

_umask: int | None = None
_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask, read once. Linux shows it in /proc (reading it there changes nothing);
    elsewhere it is read by setting and restoring it, under a lock, the first time only."""
    global _umask
    if _umask is None:
        with _umask_lock:
            if _umask is None:
                _umask = _read_umask()
    return _umask


def _read_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


# ---- errors --------------------------------------------------------------------------------

_DISK_FULL_TEXT = ("no space left", "storagefull", "disk quota", "unexpected pos", "file write failed")


def is_write_failure(e: BaseException) -> bool:
    """An OS error, or a library's wrapped one (torch.save's "unexpected pos", safetensors'
    StorageFull) that a full disk or a failing write produces."""
    if isinstance(e, WriteError):
        return False  # already says what happened
    if isinstance(e, OSError):
        return True
    return isinstance(e, Exception) and any(t in str(e).lower() for t in _DISK_FULL_TEXT)


def disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return not isinstance(e, OSError) and any(t in str(e).lower() for t in _DISK_FULL_TEXT)


def write_error(e: BaseException, path: "str | os.PathLike", size_hint: int | None = None) -> WriteError:
    """A WriteError naming ``path`` and the cause; for a full disk, how much was needed and is free."""
    if disk_full(e):
        needed = f": {human_bytes(size_hint)} needed" if size_hint else ""
        free = _free_bytes(Path(path))
        have = f", {human_bytes(free)} free" if free is not None else ""
        err = WriteError(errno.ENOSPC, f"no space left on device while writing {path}{needed}{have}; free some "
                                       "space (or write elsewhere) and run again")
    else:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        err = WriteError(getattr(e, "errno", None) or errno.EIO, f"cannot write {path}: {cause}")
    return err


def human_bytes(n: int | float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None
