"""The memory plan in the editor: "≈ 7.8 GB peak" on each TrainLoop node, the breakdown and a
target size (what to change to fit it) in the inspector.

The plan builds the model on torch's meta device, and the editor never imports torch: a
subprocess (``python -m app.ml.memory.recipe_plan``, the same planner as ``validate --plan``)
computes it off the UI thread. Plans are cached by the recipe's content and the target, and one is
asked for only once the recipe has been still for a moment, so typing into a field or dragging a
node starts nothing; a frame only reads what has arrived. An idle editor draws nothing until the
next input (app/gui/pacing.py), so a plan that arrives while it sleeps shows on the next mouse move:
keeping it awake for the planner would cost a core for as long as the plan takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dearpygui.dearpygui as dpg

from app.gui.theme import ERROR_TEXT, MUTED_TEXT

ROOT = Path(__file__).resolve().parents[2]
SETTLE_S = 0.8  # the recipe must be unchanged this long before a plan is asked for
TIMEOUT_S = 900  # a busy machine, a cold start: slow, but a plan is still wanted
_CACHE: dict[str, dict] = {}  # content key -> result, shared by the editors of this process


def plan_key(data: dict, recipe_dir: str | None, target: str) -> str:
    """What a plan depends on: nodes, links, where relative paths resolve, the target size."""
    content = json.dumps({"nodes": data.get("nodes"), "links": data.get("links"), "dir": recipe_dir,
                          "target": target}, sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


def compute(data: dict, recipe_dir: str | None, target: str, timeout: float = TIMEOUT_S) -> dict:
    """The planner's JSON for ``data`` ({"plans": [...]} or {"error": ...}), from a subprocess."""
    cmd = [sys.executable, "-m", "app.ml.memory.recipe_plan"]
    if recipe_dir:
        cmd += ["--recipe-dir", recipe_dir]
    if target:
        cmd += ["--fit", target]
    try:
        # at a lower priority: importing torch takes seconds of a core the editor must not lose (19 would
        # starve it on a busy machine: minutes)
        out = subprocess.run(cmd, input=json.dumps(data), capture_output=True, text=True, cwd=str(ROOT),
                             timeout=timeout, preexec_fn=_background if hasattr(os, "nice") else None)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"the memory planner did not answer ({e})"}
    lines = out.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    except ValueError:
        return {"error": (out.stderr.strip().splitlines() or [lines[-1]])[-1]}


def can_plan() -> bool:
    """Plans are asked for by an editor on screen: headless editors (tests driving callbacks, with
    no viewport) would only start torch imports nobody reads."""
    return dpg.is_dearpygui_running()


def _background() -> None:
    os.nice(5)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the planner gets SIGTERM when the editor goes (its thread waits on it until then), so
    closing the editor leaves no planner running on for its timeout."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the planner ends by itself (TIMEOUT_S at most)


def short(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def node_line(plan: dict) -> str:
    """The TrainLoop node's line: "≈ 28.4 GB peak" (and what fits the target, when one is set)."""
    text = f"≈ {short(plan['peak_bytes'])} peak (memory plan)"
    fit = plan.get("fit")
    if fit:
        target = short(fit["target_bytes"])
        if not fit["fits"]:
            text += f"; nothing fits {target}"
        elif fit["changes"]:
            text += f"; {target}: {' + '.join(fit['changes'])} -> {short(fit['peak_bytes'])}"
        else:
            text += f"; fits {target}"
    return text


def breakdown(plan: dict) -> list[str]:
    unit, div = ("GB", 1e9) if plan["peak_bytes"] >= 1e9 else ("MB", 1e6)
    lines = [plan["model"], f"predicted peak device memory: {short(plan['peak_bytes'])} ({plan['tokens']})"]
    lines += [f"  {k}: {v / div:.3f} {unit}" for k, v in plan["parts"].items()]
    lines += [f"note: {n}" for n in plan["notes"]]
    return lines


class MemoryPlanPanel:
    """Owns the plan's text on TrainLoop nodes and its section of the inspector."""

    def __init__(self, editor, parent) -> None:
        self.editor = editor
        self.target = ""
        self.result: dict | None = None  # the plan of the recipe as it is now (None: not yet)
        self._key = None
        self._seen = (None, None)  # (history version, doc) last looked at
        self._changed_at = 0.0
        self._thread: threading.Thread | None = None
        self._asked: str | None = None
        self._node_items: dict[str, int] = {}
        self._shown = None
        with dpg.group(parent=parent) as self.group:
            dpg.add_separator()
            dpg.add_text("Memory plan", color=MUTED_TEXT)
            self.target_input = dpg.add_input_text(
                label="fit to", hint="e.g. 12GB", width=120, on_enter=True, callback=self._on_target)
            with dpg.tooltip(self.target_input):
                dpg.add_text("A device memory size (GB, GiB or MB): the plan shows the cheapest changes that fit it",
                             wrap=280)
            self.body = dpg.add_group()
        dpg.configure_item(self.group, show=False)

    # ---- input ---------------------------------------------------------------------------------
    def _on_target(self, sender=None, value=None, user_data=None) -> None:
        self.target = str(value if value is not None else dpg.get_value(self.target_input)).strip()
        self._seen = (None, None)  # a new key now

    def set_target(self, text: str) -> None:
        dpg.set_value(self.target_input, text)
        self._on_target(value=text)

    # ---- per frame -----------------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether a plan is on its way."""
        return self._key is not None and self._key not in _CACHE

    def tick(self) -> None:
        doc = self.editor.doc
        seen = (doc.history.version, id(doc))
        now = time.monotonic()
        if seen != self._seen:
            self._seen = seen
            self._changed_at = now
            data = doc.data()
            trains = any(n.get("type") == "TrainLoop" for n in (data.get("nodes") or {}).values())
            recipe_dir = str(doc.path.resolve().parent) if doc.path else None
            self._data = (data, recipe_dir)
            self._key = plan_key(data, recipe_dir, self.target) if trains else None
        key = self._key
        if (key is not None and key not in _CACHE and self._thread is None and now - self._changed_at >= SETTLE_S
                and can_plan()):
            data, recipe_dir = self._data
            self._asked = key
            self._thread = threading.Thread(target=self._work, args=(key, data, recipe_dir, self.target), daemon=True)
            self._thread.start()
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
        self.result = _CACHE.get(key) if key is not None else None
        self._draw()

    def _work(self, key, data, recipe_dir, target) -> None:
        _CACHE[key] = compute(data, recipe_dir, target)

    # ---- drawing -------------------------------------------------------------------------------
    def _plans(self) -> dict[str, dict]:
        return {p["node"]: p for p in (self.result or {}).get("plans", [])}

    def _draw(self) -> None:
        plans = self._plans()
        canvas = self.editor.canvas
        for nid, parts in canvas.nodes.items():
            text = node_line(plans[nid]) if nid in plans else ""
            item = self._node_items.get(nid)
            if item is not None and not dpg.does_item_exist(item):
                item = None
            if item is None and text:
                with dpg.node_attribute(attribute_type=dpg.mvNode_Attr_Static, parent=parts.node) as attr:
                    item = dpg.add_text(text, color=MUTED_TEXT, wrap=360)
                self._node_items[nid] = item
                self._node_items[f"{nid}/attr"] = attr
            elif item is not None and dpg.get_value(item) != text:
                dpg.set_value(item, text)
                dpg.configure_item(item, show=bool(text))
        focus = self.editor.focus
        is_loop = focus in self.editor.doc.graph.nodes and self.editor.doc.graph.nodes[focus].type == "TrainLoop"
        shown = (focus, is_loop, json.dumps(self.result, sort_keys=True) if self.result else None, self.busy())
        if shown == self._shown:
            return
        self._shown = shown
        dpg.configure_item(self.group, show=is_loop)
        dpg.delete_item(self.body, children_only=True)
        if not is_loop:
            return
        if self.result is None:
            dpg.add_text("computing the plan..." if self._key else "", parent=self.body, color=MUTED_TEXT)
            return
        if "error" in self.result:
            dpg.add_text(f"memory plan: {self.result['error']}", parent=self.body, color=ERROR_TEXT, wrap=280)
            return
        plan = plans.get(focus)
        if plan is None:
            return
        for line in breakdown(plan):
            look = {"color": MUTED_TEXT} if line.startswith("note:") else {}
            dpg.add_text(line, parent=self.body, wrap=280, **look)
        fit = plan.get("fit")
        if fit:
            dpg.add_text(node_line(plan).split("; ", 1)[-1], parent=self.body, wrap=280)

    def report(self) -> dict:
        """What the editor shows of the plan (for tests): each TrainLoop's line and the inspector's text."""
        nodes = {nid: dpg.get_value(item) for nid, item in self._node_items.items()
                 if "/" not in nid and dpg.does_item_exist(item) and dpg.get_value(item)}
        inspector = [dpg.get_value(i) for i in dpg.get_item_children(self.body, 1) or []
                     if dpg.get_item_type(i).endswith("mvText")] if dpg.is_item_shown(self.group) else []
        return {"nodes": nodes, "inspector": inspector, "target": self.target, "busy": self.busy()}
