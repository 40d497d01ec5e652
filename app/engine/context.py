"""What a running node sees of the engine: progress, logs, metrics, previews and cancellation.

Node functions receive a NodeContext as their first argument. Everything they report goes out as
events (see events.py), the one stream that feeds the editor, the CLI progress bar and
`--events FILE.jsonl`.
"""

from __future__ import annotations

import threading
import time
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
        node reads, or that the run returns, holds ``obj``. Editor sessions keep every output for
        the next run, so there it is always False and a node must copy what it changes.
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
        """A folder for this node's files inside the workspace."""
        d = self.workspace.joinpath(f"{self.node_type}_{self.node_id}", *parts)
        d.mkdir(parents=True, exist_ok=True)
        return d


def holds(value: Any, obj: Any, _depth: int = 0) -> bool:
    """Whether ``obj`` is ``value`` or reachable from it: through containers, objects that list
    their parts with ``__contents__()`` (model handles and bundles), and torch modules' submodules."""
    if value is obj:
        return True
    if value is None or isinstance(value, (str, bytes, int, float, bool)) or _depth > 50:
        return False
    if isinstance(value, dict):
        return any(holds(v, obj, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(holds(v, obj, _depth + 1) for v in value)
    contents = getattr(value, "__contents__", None)
    if contents is not None and not isinstance(value, type):
        return any(holds(v, obj, _depth + 1) for v in contents())
    if hasattr(value, "_modules") and callable(getattr(value, "modules", None)):  # a torch module
        return any(m is obj for m in value.modules())
    return False
