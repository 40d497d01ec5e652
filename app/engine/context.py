"""What a running node sees of the engine: progress, logs, metrics, previews and cancellation.

Node functions receive a NodeContext as their first argument. Everything they report goes out as
events (see events.py), the one stream that feeds the editor, the CLI progress bar and
`--events FILE.jsonl`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from app.engine.errors import Cancelled

PROGRESS_INTERVAL_S = 0.1


class NodeContext:
    def __init__(self, *, node_id: str, node_type: str, title: str, emit: Callable[[dict], None],
                 cancel_event: threading.Event, workspace: Path, recipe: dict | None = None,
                 recipe_dir: Path | None = None, run_id: str = "",
                 live_values: Callable[[], list] | None = None) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.title = title
        self._emit = emit
        self._cancel = cancel_event
        self._workspace = workspace
        self.recipe = recipe or {}
        self.recipe_dir = recipe_dir
        self.run_id = run_id
        self._last_progress = 0.0
        self._live_values = live_values  # None: the engine keeps outputs (editor sessions)

    # ---- reporting -------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        self._emit({"event": event, "node": self.node_id, **fields})

    def progress(self, value: float, total: float | None = None, text: str = "") -> None:
        """Report progress; throttled so a tight loop cannot flood the stream. Also a cancel check."""
        now = time.monotonic()
        if total is None or value >= total or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.emit("progress", value=value, total=total, text=text)
        self.check_cancel()

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=str(message))

    def warn(self, message: str) -> None:
        self.log(message, "warning")

    def metric(self, **values: Any) -> None:
        """Training metrics (loss, lr, steps_per_s, eta_s, memory, step, epoch)."""
        self.emit("metric", values=values)

    def preview(self, kind: str, **payload: Any) -> None:
        """A preview for the editor: kind is 'images' (PNG bytes + captions), 'histogram', 'table', 'text'."""
        self.emit("preview", kind=kind, **payload)

    # ---- cancellation ----------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("stopped by the user")

    # ---- ownership -------------------------------------------------------------------------
    def exclusive(self, obj: Any) -> bool:
        """May this node change ``obj`` (part of one of its inputs) in place instead of copying it?

        True only in a one-shot run (nothing is cached for a later run) when no value that a later
        node reads, or that the run returns, holds ``obj`` (see ``holds``). Editor sessions keep
        every output for the next run, so there it is always False and a node must copy what it
        changes. The node's own inputs are not checked: one that has the same object on two
        sockets must not change it through one of them.
        """
        if self._live_values is None:
            return False
        return not any(holds(value, obj) for value in self._live_values())

    # ---- files -----------------------------------------------------------------------------
    @property
    def workspace(self) -> Path:
        """The run's workspace folder (created on first use): outputs, samples, caches, logs."""
        self._workspace.mkdir(parents=True, exist_ok=True)
        return self._workspace

    def node_dir(self, *parts: str) -> Path:
        """A folder for this node's files inside the workspace. Node ids and types are plain names
        (validation sees to it); checked again here, resolved, because deleting old backups there
        must never reach outside the workspace."""
        from app.graph.confine import OutsideWorkspace, id_problem, is_inside

        for name in (self.node_id, self.node_type, *parts):
            if id_problem(name):
                raise OutsideWorkspace(f"cannot make a folder named {name!r} for node {self.node_id}: "
                                       f"{id_problem(name)}")
        d = self.workspace.joinpath(f"{self.node_type}_{self.node_id}", *parts)
        if not is_inside(d, self.workspace):
            raise OutsideWorkspace(f"the folder {d} of node {self.node_id} resolves to {d.resolve()}, outside the "
                                   f"workspace {self.workspace.resolve()} (a symlink?); remove the link or use "
                                   "another workspace")
        d.mkdir(parents=True, exist_ok=True)
        return d


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), range, Path)
_WALK_LIMIT = 1_000_000  # objects: past this, assume the value holds it


def holds(value: Any, obj: Any) -> bool:
    """Whether ``obj`` (or, for a torch module, one of its submodules, parameters or their storage)
    is reachable from ``value``: through containers, objects that list their parts with
    ``__contents__()`` (model handles and bundles), dataclasses and objects' attributes, and torch
    modules. It errs towards True: a structure too deep or too large to walk counts as holding ``obj``."""
    parts, storages = _parts(obj)
    seen: set[int] = set()
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if id(v) in parts:
            return True
        if isinstance(v, _ATOMS) or isinstance(v, type) or id(v) in seen:
            continue
        seen.add(id(v))
        if depth > 200 or len(seen) > _WALK_LIMIT:
            return True
        if _is_tensor(v):
            if storages and _storage(v) in storages:
                return True
            continue
        if _is_module(v):
            if any(id(m) in parts for m in v.modules()) or any(
                    id(t) in parts or _storage(t) in storages for t in (*v.parameters(), *v.buffers())):
                return True
            continue
        if type(v).__module__ == "numpy":
            continue
        contents = getattr(v, "__contents__", None)
        if callable(contents):
            children = contents()
        elif isinstance(v, Mapping):
            children = v.values()
        elif isinstance(v, (list, tuple, set, frozenset)):
            children = v
        elif dataclasses.is_dataclass(v):
            children = [getattr(v, f.name, None) for f in dataclasses.fields(v)]
        elif hasattr(v, "__dict__") and not callable(v):
            children = vars(v).values()
        else:
            continue
        stack.extend((c, depth + 1) for c in children)
    return False


def _is_tensor(v: Any) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "untyped_storage")


def _is_module(v: Any) -> bool:
    return hasattr(v, "_modules") and callable(getattr(v, "modules", None)) and callable(getattr(v, "parameters", None))


def _storage(t: Any) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return -1


def _parts(obj: Any) -> tuple[set[int], set[int]]:
    """Ids of ``obj`` and, for a torch module, of its submodules and tensors; their storages."""
    parts, storages = {id(obj)}, set()
    if _is_module(obj):
        parts |= {id(m) for m in obj.modules()}
        for t in (*obj.parameters(), *obj.buffers()):
            parts.add(id(t))
            if t.numel():
                storages.add(_storage(t))
    elif _is_tensor(obj) and obj.numel():
        storages.add(_storage(obj))
    storages.discard(-1)
    storages.discard(0)
    return parts, storages
