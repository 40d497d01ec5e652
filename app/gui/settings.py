"""What the editor remembers between sessions: recent files and autosaves for crash recovery.

Everything lives in one folder ($NODETRAINER_CONFIG, else $XDG_CONFIG_HOME/nodetrainer), so a test
can point it at a temporary folder. An autosave names the process that wrote it: one whose
process is gone was left by a crash (a clean exit deletes its own), and is offered back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from app.graph.recipe import atomic_write_text

RECENT_MAX = 10
REPO_ROOT = Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    env = os.environ.get("NODETRAINER_CONFIG")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "nodetrainer"


# ---- recent files ----------------------------------------------------------------------------

def recent_files() -> list[str]:
    try:
        data = json.loads((config_dir() / "recent.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [p for p in data if isinstance(p, str)][:RECENT_MAX] if isinstance(data, list) else []


def add_recent(path) -> list[str]:
    p = str(Path(path).resolve())
    items = [p] + [r for r in recent_files() if r != p]
    try:
        atomic_write_text(config_dir() / "recent.json", json.dumps(items[:RECENT_MAX], indent=1))
    except OSError:
        pass  # an unwritable config folder must not stop the editor
    return items[:RECENT_MAX]


# ---- presets ---------------------------------------------------------------------------------

def preset_files() -> dict[str, list[Path]]:
    """Shipped recipes (presets/) and examples or the user's own (graphs/)."""
    return {name: sorted((REPO_ROOT / name).glob("*.json")) for name in ("presets", "graphs")}


# ---- autosave --------------------------------------------------------------------------------

def autosave_path(pid: int | None = None) -> Path:
    return config_dir() / "autosave" / f"autosave-{pid or os.getpid()}.json"


def write_autosave(recipe_text: str, source_path) -> Path:
    path = autosave_path()
    data = {"pid": os.getpid(), "saved_at": time.time(), "path": str(source_path) if source_path else None,
            "recipe": recipe_text}
    atomic_write_text(path, json.dumps(data))
    return path


def clear_autosave() -> None:
    try:
        autosave_path().unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned_autosaves() -> list[dict]:
    """Autosaves whose editor is gone (it crashed or was killed), newest first."""
    folder = config_dir() / "autosave"
    found = []
    for p in folder.glob("autosave-*.json") if folder.is_dir() else []:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            pid = int(data.get("pid", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if pid == os.getpid() or (pid and _alive(pid)):
            continue
        data["file"] = str(p)
        found.append(data)
    return sorted(found, key=lambda d: d.get("saved_at", 0), reverse=True)


def discard_autosave(entry: dict) -> None:
    try:
        Path(entry["file"]).unlink()
    except (OSError, KeyError):
        pass
