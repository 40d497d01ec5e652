"""What the editor knows about a run, folded from the worker's events (see app/engine/events.py).

Kept apart from drawing so that the badges, plots and previews are a pure function of the event
stream: the render loop applies each frame's events here, then redraws only the nodes that changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MAX_POINTS = 5000  # metric history kept per series; older points are thinned, not dropped
MAX_IMAGE_PREVIEWS = 12  # image previews kept per node (e.g. TrainLoop samples over time)

BADGES = {"queued": "queued", "running": "running", "cached": "cached", "done": "done", "error": "error",
          "cancelled": "stopped"}


@dataclass
class NodeRun:
    status: str = ""  # '', queued, running, cached, done, error, cancelled
    value: float = 0.0
    total: float | None = None
    text: str = ""
    message: str = ""  # the error, for node_error
    traceback: str = ""
    elapsed_s: float | None = None
    metrics: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> [(step, value)]
    last_metric: dict = field(default_factory=dict)
    previews: dict[str, dict] = field(default_factory=dict)  # kind -> latest payload
    image_history: list[dict] = field(default_factory=list)  # every 'images' preview, newest last
    logs: list[tuple[str, str]] = field(default_factory=list)
    metric_version: int = 0
    preview_version: int = 0

    @property
    def fraction(self) -> float | None:
        if self.total:
            return max(0.0, min(1.0, self.value / self.total))
        return None

    def badge(self) -> str:
        if self.status == "running":
            f = self.fraction
            return f"running {f * 100:.0f}%" if f is not None else "running"
        if self.status == "done" and self.elapsed_s is not None:
            return f"done in {self.elapsed_s:.1f} s"
        return BADGES.get(self.status, "")


class RunState:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeRun] = {}
        self.run_id: str | None = None
        self.running = False
        self.status = ""  # last run's status
        self.message = ""
        self.order: list[str] = []
        self.started = 0.0
        self.problems: list[dict] = []

    def node(self, node_id: str) -> NodeRun:
        return self.nodes.setdefault(node_id, NodeRun())

    def begin(self, run_id: str | None = None) -> None:
        """Called when the user presses Run, before the worker answers."""
        self.running = True
        self.run_id = run_id
        self.status = "starting"
        self.message = "starting the worker..."
        self.started = time.monotonic()
        for n in self.nodes.values():
            if n.status in ("queued", "running"):
                n.status = ""

    def apply(self, event: dict) -> set[str]:
        """Fold one event in; returns the ids of nodes whose look changed."""
        kind = event.get("event")
        nid = event.get("node")
        run_id = event.get("run_id")
        if run_id and self.run_id and run_id != self.run_id and kind not in ("worker_died",):
            return set()  # a stale event from a run we stopped waiting for
        if kind == "run_start":
            self.run_id = run_id or self.run_id
            self.order = list(event.get("nodes", []))
            self.status, self.message = "running", ""
            for n in self.order:
                r = self.node(n)
                r.status, r.value, r.total, r.message, r.text, r.elapsed_s = "queued", 0.0, None, "", "", None
            return set(self.order)
        if nid is None and kind not in ("run_done", "worker_died", "log"):
            return set()
        if kind == "node_start":
            r = self.node(nid)
            r.status, r.value, r.total = "running", 0.0, None
            r.metrics, r.last_metric, r.metric_version = {}, {}, r.metric_version + 1
        elif kind == "node_cached":
            self.node(nid).status = "cached"
        elif kind == "progress":
            r = self.node(nid)
            r.value, r.total, r.text = float(event.get("value") or 0), event.get("total"), event.get("text", "")
        elif kind == "metric":
            self._metric(self.node(nid), event.get("values") or {})
        elif kind == "preview":
            self._preview(self.node(nid), event)
        elif kind == "log":
            if nid is not None:
                self.node(nid).logs.append((event.get("level", "info"), str(event.get("message", ""))))
            self.message = str(event.get("message", ""))
            return {nid} if nid else set()
        elif kind == "node_done":
            r = self.node(nid)
            r.status, r.elapsed_s = "done", event.get("elapsed_s")
            if r.total:
                r.value = r.total
        elif kind == "node_error":
            r = self.node(nid)
            r.status, r.message, r.traceback = "error", str(event.get("message", "failed")), event.get("traceback", "")
        elif kind == "node_cancelled":
            self.node(nid).status = "cancelled"
        elif kind == "worker_died":
            self.message = str(event.get("message", "the worker process died"))
            return set()
        elif kind == "run_done":
            return self._done(event)
        else:
            return set()
        return {nid}

    def _done(self, event: dict) -> set[str]:
        self.running = False
        self.status = event.get("status", "error")
        self.problems = list(event.get("problems") or [])
        changed = set()
        for nid, r in self.nodes.items():
            if r.status in ("queued", "running"):
                r.status = "cancelled" if self.status == "cancelled" else ""
                changed.add(nid)
        elapsed = event.get("elapsed_s")
        took = f" in {elapsed:.1f} s" if isinstance(elapsed, (int, float)) else ""
        self.message = {"done": f"run finished{took}", "cancelled": "run stopped",
                        "invalid": "the recipe has problems; nothing was run"}.get(
            self.status, f"run failed: {event.get('message', '')}".rstrip(": "))
        return changed

    def _metric(self, r: NodeRun, values: dict) -> None:
        step = values.get("step")
        for name, value in values.items():
            if name in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            series = r.metrics.setdefault(name, [])
            x = float(step) if isinstance(step, (int, float)) else float(len(series))
            series.append((x, float(value)))
            if len(series) > MAX_POINTS:
                del series[1:len(series) // 2 * 2:2]  # thin the older half evenly, keep the first point
        r.last_metric.update(values)
        r.metric_version += 1

    def _preview(self, r: NodeRun, event: dict) -> None:
        kind = str(event.get("kind", "text"))
        payload = {k: v for k, v in event.items() if k not in ("event", "node", "run_id", "t")}
        r.previews[kind] = payload
        if kind == "images":
            payload["step"] = r.last_metric.get("step")
            r.image_history.append(payload)
            del r.image_history[:-MAX_IMAGE_PREVIEWS]
        r.preview_version += 1

    # ---- summaries for the status bar ---------------------------------------------------------------
    def overall(self) -> float:
        """Fraction of the run done: finished nodes count whole, the running one by its progress."""
        if not self.order:
            return 1.0 if self.status == "done" else 0.0
        total = 0.0
        for nid in self.order:
            r = self.nodes.get(nid)
            if r is None:
                continue
            if r.status in ("done", "cached", "error"):
                total += 1
            elif r.status == "running":
                total += r.fraction or 0.0
        return total / len(self.order)

    def current(self) -> str | None:
        return next((nid for nid in self.order if self.nodes.get(nid) and self.nodes[nid].status == "running"), None)


def format_eta(seconds) -> str:
    if not isinstance(seconds, (int, float)) or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def paths_relative(event: dict, base: str | None) -> dict:
    """A preview or log event with paths inside the recipe's folder written relative to it, as the
    recipe itself writes them: nodes report resolved paths (`/home/me/recipes/data/shapes`), the
    editor shows `data/shapes`. Errors keep their full paths."""
    if not base or event.get("event") not in ("preview", "log"):
        return event
    prefix = base.rstrip("/\\") + ("\\" if "\\" in base and "/" not in base else "/")

    def fix(value):
        if isinstance(value, str):
            return value.replace(prefix, "")
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value  # image bytes, numbers

    return fix(event)
