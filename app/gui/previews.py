"""Drawing what nodes report: `preview` events (images, histogram, table, text) and `metric`
events (live loss / LR plots with step/s and ETA).

The same functions draw a compact form inside a node and a full form in the inspector. Images
are decoded once per distinct PNG and kept as textures, so a preview that is redrawn (or shown in
two places) costs no decoding.
"""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Callable

import dearpygui.dearpygui as dpg
import numpy as np

from app.gui.runstate import NodeRun, format_eta
from app.gui.theme import MUTED_TEXT

MAX_TEXTURE_SIDE = 512
MAX_TEXTURES = 400


class Textures:
    """PNG bytes -> texture id, decoded with Pillow (never torch), capped to MAX_TEXTURE_SIDE."""

    def __init__(self) -> None:
        self.registry = dpg.add_texture_registry()
        self.items: dict[str, tuple[int, int, int]] = {}  # digest -> (texture, width, height)
        # Importing Pillow takes tens of milliseconds: do it off the render thread, before the
        # first preview arrives, so that frame does not stall.
        threading.Thread(target=lambda: __import__("PIL.Image"), name="import-pillow", daemon=True).start()

    def get(self, png: bytes) -> tuple[int, int, int] | None:
        digest = hashlib.sha1(png).hexdigest()
        hit = self.items.get(digest)
        if hit:
            return hit
        try:
            from PIL import Image

            img = Image.open(io.BytesIO(png)).convert("RGBA")
            img.thumbnail((MAX_TEXTURE_SIDE, MAX_TEXTURE_SIDE))
            data = (np.asarray(img, dtype=np.float32) / 255.0).ravel()
        except Exception:
            return None  # a broken preview image must not break the editor
        if len(self.items) >= MAX_TEXTURES:
            old_digest, (old, _, _) = next(iter(self.items.items()))
            del self.items[old_digest]
            dpg.delete_item(old)
        tex = dpg.add_static_texture(img.width, img.height, data, parent=self.registry)
        self.items[digest] = (tex, img.width, img.height)
        return self.items[digest]


def _fit(w: int, h: int, side: int) -> tuple[int, int]:
    scale = side / max(w, h, 1)
    return max(1, int(w * scale)), max(1, int(h * scale))


def draw_images(parent, payload: dict, textures: Textures, *, side: int = 64, per_row: int = 4, limit: int = 8,
                captions: bool = False, on_click: Callable[[bytes, str], None] | None = None) -> None:
    images = list(payload.get("images") or [])
    caps = list(payload.get("captions") or [])
    shown = images[:limit]
    row = None
    for i, png in enumerate(shown):
        if i % per_row == 0:
            row = dpg.add_group(horizontal=True, parent=parent)
        tex = textures.get(bytes(png)) if isinstance(png, (bytes, bytearray)) else None
        caption = str(caps[i]) if i < len(caps) else ""
        cell = dpg.add_group(parent=row)
        if tex is None:
            dpg.add_text("(unreadable image)", parent=cell, color=MUTED_TEXT)
            continue
        w, h = _fit(tex[1], tex[2], side)
        button = dpg.add_image_button(tex[0], width=w, height=h, parent=cell,
                             callback=(lambda s, a, u: on_click(*u)) if on_click else None,
                             user_data=(bytes(png), caption))
        if caption:
            if captions:
                dpg.add_text(caption[:40], parent=cell, wrap=side + 10, color=MUTED_TEXT)
            with dpg.tooltip(button):
                dpg.add_text(caption, wrap=300)
    if len(images) > len(shown):
        dpg.add_text(f"+{len(images) - len(shown)} more (see the inspector)", parent=parent, color=MUTED_TEXT)


def draw_histogram(parent, payload: dict, *, compact: bool, scale: float = 1.0) -> None:
    labels = [str(l) for l in payload.get("labels") or []]
    counts = [float(c) for c in payload.get("counts") or []]
    title = str(payload.get("title") or "histogram")
    if not counts:
        dpg.add_text(f"{title}: empty", parent=parent, color=MUTED_TEXT)
        return
    if compact:
        dpg.add_simple_plot(default_value=counts, histogram=True, overlay=f"{title} ({int(sum(counts))})",
                            width=max(1, round(240 * scale)), height=max(1, round(60 * scale)), parent=parent)
        return
    with dpg.plot(label=title, height=220, width=-1, parent=parent, no_menus=True, no_box_select=True):
        x = dpg.add_plot_axis(dpg.mvXAxis, no_gridlines=True)
        if labels and len(labels) <= 40:
            dpg.set_axis_ticks(x, tuple((l, i) for i, l in enumerate(labels)))
        with dpg.plot_axis(dpg.mvYAxis, label="count"):
            dpg.add_bar_series(list(range(len(counts))), counts, weight=0.7)
    for label, count in list(zip(labels, counts))[:40]:
        dpg.add_text(f"{label}: {count:g}", parent=parent, bullet=True)


def draw_table(parent, payload: dict, *, compact: bool) -> None:
    rows = list(payload.get("rows") or [])
    columns = list(payload.get("columns") or [])
    if rows and isinstance(rows[0], dict) and not columns:
        columns = list(rows[0].keys())
    title = payload.get("title")
    if title:
        dpg.add_text(str(title), parent=parent)
    limit = 5 if compact else 200
    with dpg.table(header_row=True, parent=parent, borders_innerH=True, borders_outerH=True,
                   borders_innerV=True, borders_outerV=True, width=260 if compact else -1,
                   policy=dpg.mvTable_SizingStretchProp):
        for c in columns or ["value"]:
            dpg.add_table_column(label=str(c))
        for row in rows[:limit]:
            with dpg.table_row():
                cells = [row.get(c, "") for c in columns] if isinstance(row, dict) else (
                    list(row) if isinstance(row, (list, tuple)) else [row])
                for cell in cells:
                    dpg.add_text(str(cell)[:60])
    if len(rows) > limit:
        dpg.add_text(f"{len(rows) - limit} more rows", parent=parent, color=MUTED_TEXT)


def draw_text(parent, payload: dict, *, compact: bool) -> None:
    text = str(payload.get("text") or payload.get("message") or "")
    if compact:
        lines = text.splitlines()
        text = "\n".join(lines[:6]) + ("\n..." if len(lines) > 6 else "")
    dpg.add_text(text, parent=parent, wrap=260 if compact else 0)


def draw_preview(parent, kind: str, payload: dict, textures: Textures, *, compact: bool,
                 on_click: Callable[[bytes, str], None] | None = None, scale: float = 1.0) -> None:
    """scale: the canvas' zoom, for the compact form drawn inside a node."""
    if kind == "images":
        if compact:
            draw_images(parent, payload, textures, side=max(8, round(56 * scale)), per_row=4, limit=8,
                        on_click=on_click)
        else:
            draw_images(parent, payload, textures, side=120, per_row=2, limit=64, captions=True, on_click=on_click)
    elif kind == "histogram":
        draw_histogram(parent, payload, compact=compact, scale=scale)
    elif compact:
        # tables and reports would make the node tall and cover its neighbours: one line here,
        # the whole thing in the inspector
        if kind == "table":
            n = len(payload.get("rows") or [])
            line = f"{payload.get('title') or 'table'}: {n} row{'s' if n != 1 else ''}"
        else:
            text = str(payload.get("text") or payload.get("message") or "").strip()
            line = text.splitlines()[0] if text else ""
        if line:
            dpg.add_text((line if len(line) <= 48 else line[:45] + "...") + "  (inspector)", parent=parent,
                         color=MUTED_TEXT)
    elif kind == "table":
        draw_table(parent, payload, compact=False)
    else:
        draw_text(parent, payload, compact=False)


class MetricsView:
    """Live training plots in a node: loss and learning rate against step, and a line with the
    step, steps/s and ETA. Updating means replacing two series' data: cheap at any frame rate."""

    def __init__(self, parent, width: int = 280, height: int = 110) -> None:
        self.group = dpg.add_group(parent=parent)
        self.line = dpg.add_text("waiting for the first step...", parent=self.group, color=MUTED_TEXT)
        self.series: dict[str, tuple[int, int, int]] = {}
        for name, label in (("loss", "loss"), ("lr", "learning rate")):
            with dpg.plot(height=height, width=width, parent=self.group, no_menus=True, no_box_select=True,
                          no_mouse_pos=True, no_title=True):
                dpg.add_plot_legend(location=dpg.mvPlot_Location_NorthEast)
                x = dpg.add_plot_axis(dpg.mvXAxis, no_tick_labels=False)
                y = dpg.add_plot_axis(dpg.mvYAxis)
                s = dpg.add_line_series([], [], label=label, parent=y)
            self.series[name] = (s, x, y)
        self.version = -1

    def update(self, run: NodeRun) -> None:
        if run.metric_version == self.version:
            return
        self.version = run.metric_version
        for name, (series, x, y) in self.series.items():
            points = run.metrics.get(name) or []
            if points:
                xs = [p[0] for p in points]
                ys = [p[1] for p in points]
                dpg.set_value(series, [xs, ys])
                dpg.fit_axis_data(x)
                dpg.fit_axis_data(y)
        m = run.last_metric
        parts = []
        if "step" in m:
            parts.append(f"step {m['step']}")
        if "epoch" in m:
            parts.append(f"epoch {m['epoch']}")
        if isinstance(m.get("loss"), (int, float)):
            parts.append(f"loss {m['loss']:.4g}")
        if isinstance(m.get("steps_per_s"), (int, float)):
            parts.append(f"{m['steps_per_s']:.2f} step/s")
        if "eta_s" in m:
            parts.append(f"ETA {format_eta(m['eta_s'])}")
        if parts:
            dpg.set_value(self.line, "  ".join(parts))
