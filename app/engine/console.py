"""Terminal rendering of the event stream: one line per node, a live progress bar, a summary."""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleReporter:
    def __init__(self, stream: IO[str] | None = None, verbose: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.verbose = verbose
        self.bar_open = False
        self.count = 0
        self.titles: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.metrics: dict[str, dict] = {}
        self.first_progress: dict[str, tuple[float, float]] = {}  # node -> (time, value) of its first report
        self.last_line_pct: dict[str, int] = {}

    def _name(self, e: dict) -> str:
        nid = e.get("node")
        return f"{e.get('title') or self.titles.get(nid, '?')} (node {nid})"

    def _print(self, text: str) -> None:
        if self.bar_open:
            self.stream.write("\r\033[K")
            self.bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, e: dict) -> None:
        kind = e.get("event")
        if kind == "run_start":
            self.count = len(e.get("nodes", []))
            self.titles = e.get("titles", {})
            self._print(f"Running {self.count} node(s): " + ", ".join(self.titles.get(n, n) for n in e.get("nodes", [])))
        elif kind == "node_cached":
            self._print(f"[{e['index'] + 1}/{e['count']}] {self._name(e)}: cached")
        elif kind == "node_start":
            self.started[e["node"]] = time.monotonic()
            self._print(f"[{e['index'] + 1}/{e['count']}] {self._name(e)} ...")
        elif kind == "progress":
            self._progress(e)
        elif kind == "metric":
            self.metrics[e.get("node")] = {**self.metrics.get(e.get("node"), {}), **e.get("values", {})}
        elif kind == "log":
            level = e.get("level", "info")
            if level != "debug" or self.verbose:
                prefix = "" if level == "info" else f"{level}: "
                self._print(f"    {prefix}{e.get('message', '')}")
        elif kind == "node_done":
            self._print(f"    done in {e.get('elapsed_s', 0):.2f} s")
        elif kind == "node_error":
            self._print(f"ERROR in {self._name(e)}: {e.get('message')}")
            if self.verbose and e.get("traceback"):
                self._print(e["traceback"].rstrip())
        elif kind == "node_cancelled":
            self._print(f"    stopped {self._name(e)}")
        elif kind == "worker_died":
            self._print(f"ERROR: {e.get('message')}")
        elif kind == "run_done":
            status = e.get("status")
            if status == "done":
                self._print(f"Finished in {e.get('elapsed_s', 0):.1f} s "
                            f"({len(e.get('executed', []))} ran, {len(e.get('cached', []))} cached)")
            elif status == "cancelled":
                self._print("Stopped by the user.")
            elif status == "invalid":
                self._print("The recipe is invalid:")
                for p in e.get("problems", []) or [{"message": e.get("message")}]:
                    where = f"node {p['node']} ({p.get('title')}): " if p.get("node") else "recipe: "
                    self._print(f"  {where}{p['message']}")

    def _eta(self, nid, value: float, total: float, metrics: dict) -> float | None:
        """Time left: the node's own estimate (TrainLoop's, from its step rate) if it gives one,
        else the rate since the node's first progress report, so set-up time before the first
        step (model moves, "before" samples) does not inflate it."""
        if metrics.get("eta_s") is not None:
            return float(metrics["eta_s"])
        now = time.monotonic()
        t0, v0 = self.first_progress.setdefault(nid, (now, value))
        if value <= v0 or now <= t0:
            return None  # no rate yet
        return (total - value) * (now - t0) / (value - v0)

    def _progress(self, e: dict) -> None:
        value, total = e.get("value", 0), e.get("total")
        nid = e.get("node")
        extra = e.get("text") or ""
        m = self.metrics.get(nid, {})
        if "loss" in m:
            extra += f" loss {m['loss']:.4f}"
        if "steps_per_s" in m:
            extra += f" {m['steps_per_s']:.2f} it/s"
        elapsed = time.monotonic() - self.started.get(nid, time.monotonic())
        if total:
            frac = min(1.0, value / total) if total else 0
            eta = self._eta(nid, value, total, m)
            width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - 60))
            filled = int(frac * width)
            line = f"    [{'#' * filled}{'.' * (width - filled)}] {value}/{total} {frac * 100:5.1f}% " \
                   f"{fmt_duration(elapsed)}<{'?' if eta is None else fmt_duration(eta)} {extra}".rstrip()
            pct = int(frac * 10)
        else:
            line = f"    {value} {extra}".rstrip()
            pct = -1
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.bar_open = True
        elif pct != self.last_line_pct.get(nid) or pct == -1 and self.verbose:
            self.last_line_pct[nid] = pct
            self._print(line)
