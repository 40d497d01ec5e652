"""The panels around the canvas: the node library (by category, with a filter), the search popup
that adds nodes (and links them when opened from a dragged pin), the problem list, the inspector
and the status bar. Each panel draws; the editor decides what its clicks do."""

from __future__ import annotations

from typing import Callable

import dearpygui.dearpygui as dpg

from app.gui.previews import Textures, draw_preview
from app.gui.runstate import NodeRun, RunState
from app.gui.search import by_category, search_specs
from app.gui.theme import ERROR_TEXT, MUTED_TEXT, Themes


class Library:
    """Every node type by category; a click adds one at the centre of the view."""

    def __init__(self, parent, registry, on_pick: Callable[[str], None]) -> None:
        self.registry = registry
        self.on_pick = on_pick
        dpg.add_text("Nodes", parent=parent)
        self.filter = dpg.add_input_text(hint="filter", width=-1, parent=parent, callback=lambda: self.refresh())
        self.body = dpg.add_group(parent=parent)
        self.refresh()

    def refresh(self) -> None:
        dpg.delete_item(self.body, children_only=True)
        query = dpg.get_value(self.filter) or ""
        specs = {s.type for s in search_specs(self.registry, query)}
        for category, items in by_category(self.registry).items():
            items = [s for s in items if s.type in specs]
            if not items:
                continue
            with dpg.collapsing_header(label=category, default_open=True, parent=self.body):
                for spec in items:
                    b = dpg.add_button(label=spec.title, width=-1, callback=lambda s, a, u: self.on_pick(u),
                                       user_data=spec.type)
                    with dpg.tooltip(b):
                        dpg.add_text(spec.description, wrap=320)


class SearchPopup:
    """The quick-add box (double-click the canvas, Space, or drop a link on empty canvas)."""

    def __init__(self, registry, on_pick: Callable[[str], None]) -> None:
        self.registry = registry
        self.on_pick = on_pick
        self.pin_type: str | None = None
        self.side: str | None = None
        self.results: list = []
        with dpg.window(label="Add node", show=False, width=340, height=360, no_collapse=True,
                        on_close=lambda: self.hide()) as self.window:
            self.hint = dpg.add_text("", color=MUTED_TEXT, wrap=320)
            self.query = dpg.add_input_text(hint="search nodes (Enter adds the first)", width=-1,
                                            callback=lambda: self.refresh(), on_enter=False)
            self.list = dpg.add_child_window(height=-1, border=False)

    @property
    def shown(self) -> bool:
        return bool(dpg.is_item_shown(self.window))

    def open(self, pos, pin_type: str | None = None, side: str | None = None, hint: str = "") -> None:
        self.pin_type, self.side = pin_type, side
        dpg.set_value(self.hint, hint or ("Add a node" if not pin_type else
                                         f"Nodes that can take this {pin_type} pin"))
        dpg.set_value(self.query, "")
        self.refresh()
        dpg.configure_item(self.window, show=True, pos=[int(pos[0]), int(pos[1])])
        dpg.focus_item(self.query)

    def hide(self) -> None:
        dpg.configure_item(self.window, show=False)

    def refresh(self) -> None:
        self.results = search_specs(self.registry, dpg.get_value(self.query) or "", self.pin_type, self.side)
        dpg.delete_item(self.list, children_only=True)
        for spec in self.results[:60]:
            dpg.add_selectable(label=f"{spec.title}   ({spec.category})", parent=self.list,
                               callback=lambda s, a, u: self.pick(u), user_data=spec.type)
        if not self.results:
            dpg.add_text("no matching node", parent=self.list, color=MUTED_TEXT)

    def pick(self, type_id: str | None = None) -> None:
        if type_id is None:
            if not self.results:
                return
            type_id = self.results[0].type
        self.hide()
        self.on_pick(type_id)


class ProblemList:
    """Validation problems; clicking one focuses its node."""

    def __init__(self, parent, on_pick: Callable[[str], None]) -> None:
        self.on_pick = on_pick
        self.header = dpg.add_collapsing_header(label="Problems", default_open=True, parent=parent)
        self.body = dpg.add_group(parent=self.header)
        self.shown: list = []
        with dpg.theme() as self.theme:
            with dpg.theme_component(dpg.mvAll):
                dpg.add_theme_color(dpg.mvThemeCol_Text, ERROR_TEXT)

    def show(self, problems) -> None:
        key = [(p.node_id, p.message) for p in problems]
        if key == self.shown:
            return
        self.shown = key
        dpg.delete_item(self.body, children_only=True)
        dpg.set_item_label(self.header, f"Problems ({len(problems)})" if problems else "Problems (none)")
        for p in problems:
            where = f"node {p.node_id} ({p.title})" if p.node_id else "recipe"
            item = dpg.add_selectable(label=f"{where}: {p.message}", parent=self.body, span_columns=True,
                                      callback=lambda s, a, u: (dpg.set_value(s, False), self.on_pick(u)),
                                      user_data=p.node_id)
            dpg.bind_item_theme(item, self.theme)


class Inspector:
    """The focused node in full: its description, badge, error and traceback, every preview with
    captions (TrainLoop samples over time), logs, and a re-roll for nodes with a seed."""

    def __init__(self, parent, textures: Textures, on_click, on_reroll, on_run_to) -> None:
        self.textures = textures
        self.on_click = on_click
        self.on_reroll = on_reroll
        self.on_run_to = on_run_to
        self.header = dpg.add_collapsing_header(label="Inspector", default_open=True, parent=parent)
        self.body = dpg.add_group(parent=self.header)
        self.key = None

    def show(self, doc, nid: str | None, run: NodeRun | None) -> None:
        key = (nid, run.preview_version if run else -1, run.status if run else "", len(run.logs) if run else 0,
               doc.graph.nodes[nid].title if nid in doc.graph.nodes else None)
        if key == self.key:
            return
        self.key = key
        dpg.delete_item(self.body, children_only=True)
        b = self.body
        if nid is None or nid not in doc.graph.nodes:
            dpg.add_text("Click a node (or a problem) to inspect it.", parent=b, color=MUTED_TEXT, wrap=280)
            return
        node = doc.graph.nodes[nid]
        spec = doc.registry.get(node.type)
        dpg.add_text(f"node {nid}: {node.label()}", parent=b)
        if spec:
            dpg.add_text(spec.description, parent=b, wrap=280, color=MUTED_TEXT)
        with dpg.group(horizontal=True, parent=b):
            dpg.add_button(label="Run to here", callback=lambda: self.on_run_to(nid))
            if spec and spec.input("seed") is not None and not spec.input("seed").is_socket:
                dpg.add_button(label="Re-roll (seed + 1)", callback=lambda: self.on_reroll(nid))
        if run is None:
            return
        if run.badge():
            dpg.add_text(run.badge(), parent=b)
        if run.message:
            dpg.add_text(run.message, parent=b, color=ERROR_TEXT, wrap=280)
        if run.traceback:
            with dpg.tree_node(label="traceback", parent=b, default_open=False):
                dpg.add_text(run.traceback[-4000:], wrap=0)
        for kind, payload in run.previews.items():
            if kind == "images" and len(run.image_history) > 1:
                continue  # shown below, over time
            dpg.add_separator(parent=b)
            draw_preview(b, kind, payload, self.textures, compact=False, on_click=self.on_click)
        if len(run.image_history) > 1:
            dpg.add_separator(parent=b)
            dpg.add_text("images over time (newest first)", parent=b)
            for payload in reversed(run.image_history):
                step = payload.get("step")
                dpg.add_text(f"step {step}" if step is not None else "", parent=b, color=MUTED_TEXT)
                draw_preview(b, "images", payload, self.textures, compact=False, on_click=self.on_click)
        if run.logs:
            with dpg.tree_node(label=f"log ({len(run.logs)})", parent=b, default_open=False):
                for level, msg in run.logs[-50:]:
                    dpg.add_text(f"{level}: {msg}", wrap=280)


class StatusBar:
    def __init__(self, parent, themes: Themes) -> None:
        with dpg.group(horizontal=True, parent=parent):
            self.progress = dpg.add_progress_bar(default_value=0.0, width=260, overlay="idle")
            dpg.bind_item_theme(self.progress, themes.progress_bar)
            self.text = dpg.add_text("")
            self.right = dpg.add_text("", color=MUTED_TEXT)
        self.last = None

    def show(self, run: RunState, message: str, extra: str = "") -> None:
        overall = run.overall() if (run.running or run.status == "done") else 0.0
        if run.running:
            cur = run.current()
            overlay = f"{overall * 100:.0f}%" + (f"  node {cur}" if cur else "")
        else:
            overlay = run.status or "idle"
        key = (round(overall, 3), overlay, message, extra)
        if key == self.last:
            return
        self.last = key
        dpg.set_value(self.progress, overall)
        dpg.configure_item(self.progress, overlay=overlay)
        dpg.set_value(self.text, message)
        dpg.set_value(self.right, extra)
