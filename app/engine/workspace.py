"""A run's workspace: one run at a time, and no temp debris left from the last one.

Two runs writing into one workspace would overwrite each other's periodic saves, backups and
samples, and resuming "your" backup could continue the other run. So a run holds
``.nodetrainer.lock`` in its workspace (owner pid, host, start time, recipe) for as long as it
runs; a second run stops at once naming the first. A lock whose process is gone (a ``kill -9``,
a power cut) is taken over with a note. The editor's long-lived worker takes and releases the lock
per run, so its runs one after another keep working.

While it holds the lock, a run removes temporary files and folders that an interrupted run left
(``.nodetrainer-tmp-*`` from app/atomic.py, and the older ``.tmp_step_*`` backup folders and
``.<name>.XXXXXXXX.tmp`` files) and says how much space that freed. Deletion follows no symlink,
stays inside the workspace and touches only those names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.atomic import TMP_PREFIX, human_bytes

LOCK_NAME = ".nodetrainer.lock"
# temp names of earlier versions: tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") and backups' own
_LEGACY_TMP = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\.tmp_step_\d+_\d+$"),
               re.compile(r"^\..+\.old\.[a-z0-9_]{8}$"))
_UNREADABLE_LOCK_GRACE_S = 30.0  # a lock file without content younger than this is being written


class WorkspaceBusy(RuntimeError):
    """Another run is writing into this workspace."""


@dataclass
class WorkspaceLock:
    """Hold with ``acquire()`` / ``release()`` (or ``with``). ``notes``: what taking it involved."""

    workspace: Path
    recipe: str = ""
    run_id: str = ""
    notes: list[str] = field(default_factory=list)
    _held: bool = False

    @property
    def path(self) -> Path:
        return Path(self.workspace) / LOCK_NAME

    def acquire(self) -> "WorkspaceLock":
        Path(self.workspace).mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "recipe": self.recipe, "run_id": self.run_id}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
            self._held = True
            return self
        raise WorkspaceBusy(f"cannot take the workspace lock {self.path}")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            owner = _read_lock(self.path)
            if owner is None or (owner.get("pid") == os.getpid() and owner.get("run_id") == self.run_id):
                self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> "WorkspaceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _take_over_if_stale(self) -> None:
        owner = _read_lock(self.path)
        if owner is None:
            try:
                age = time.time() - os.lstat(self.path).st_mtime
            except FileNotFoundError:
                return
            if age < _UNREADABLE_LOCK_GRACE_S:
                time.sleep(0.2)  # its owner is writing it
                owner = _read_lock(self.path)
                if owner is None:
                    raise WorkspaceBusy(f"the workspace {self.workspace} is being claimed by another run "
                                        f"(its lock {self.path} is being written); wait for that run or use "
                                        "another --workspace")
            else:
                self._remove(f"took over the unreadable lock {self.path}")
                return
        pid, host = owner.get("pid"), owner.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            self._remove(f"took over the workspace lock of run {owner.get('run_id') or '?'} (pid {pid}, started "
                         f"{owner.get('started', '?')}), whose process is gone")
            return
        where = f"pid {pid}" + (f" on {host}" if host != socket.gethostname() else "")
        recipe = f" running {owner.get('recipe')}" if owner.get("recipe") else ""
        raise WorkspaceBusy(
            f"the workspace {self.workspace} is in use by another run ({where}{recipe}, started "
            f"{owner.get('started', '?')}); two runs in one workspace would overwrite each other's saves, "
            f"backups and samples. Wait for it to finish, stop it, or use another --workspace"
            + (f" (if that run is gone, delete {self.path})" if host != socket.gethostname() else ""))

    def _remove(self, note: str) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        self.notes.append(note)


def _read_lock(path: Path) -> dict | None:
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# ---- temp debris ---------------------------------------------------------------------------

def is_debris(name: str) -> bool:
    """A temp file or folder name this program creates (never a user's name)."""
    return name.startswith(TMP_PREFIX) or any(p.match(name) for p in _LEGACY_TMP)


def clean_debris(workspace: str | os.PathLike) -> tuple[int, int]:
    """Remove temp files and folders left in ``workspace`` by interrupted runs; (count, bytes freed).

    Call it only while holding the workspace lock: then no live run owns them. Walks the real
    folders of the workspace only (no symlink is followed or removed)."""
    root = Path(workspace)
    if not root.is_dir() or root.is_symlink():
        return 0, 0
    count = freed = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [d for d in dirnames if is_debris(d)]:
            dirnames.remove(name)  # do not walk into what is removed
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            size = _tree_size(p)
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                count, freed = count + 1, freed + size
        for name in filenames:
            if not is_debris(name):
                continue
            p = Path(dirpath) / name
            try:
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode):
                    continue
                p.unlink()
            except OSError:
                continue
            count, freed = count + 1, freed + st.st_size
    return count, freed


def debris_note(count: int, freed: int) -> str:
    return (f"removed {count} temporary file(s) left by an interrupted run in this workspace "
            f"({human_bytes(freed)} freed)")


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
