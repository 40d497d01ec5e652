"""The node editor view of a Document: one Dear PyGui node per graph node, built from its spec.

The canvas holds no state of its own that matters: `sync` makes the items match the model after
any command (including undo/redo), and the maps here translate between Dear PyGui item ids and
model ids (node id, socket name, link id) for the callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import dearpygui.dearpygui as dpg

from app.gui import commands as C
from app.gui.previews import MetricsView, Textures, draw_preview
from app.gui.runstate import NodeRun
from app.gui.theme import ERROR_TEXT, MUTED_TEXT, PIN_SHAPES, Themes
from app.gui.view import DEFAULT_NODE_SIZE, FONT_SIZE, View, font_file, font_size_for
from app.gui.widgets import add_param_widget, add_sweep_mark, set_widget_value, show_sweep_mark, widget_value

NODE_WIDTH = 260  # wrap width for messages inside a node
# Recipes place nodes about 300 x 220 grid units apart, so a node shows its first few params and
# keeps the rest under "more": the graph stays readable at a glance, as in ComfyUI.
PARAMS_SHOWN = 5
OUTPUT_RIGHT, CHAR_W = 235, 7.3


@dataclass(frozen=True)
class Pin:
    node: str
    name: str
    side: str  # 'in' or 'out'
    type: str


@dataclass
class NodeItems:
    node: int
    type: str
    badge: int = 0
    error: int = 0
    preview: int = 0
    metrics_parent: int = 0
    metrics: MetricsView | None = None
    preview_version: int = -1
    look: tuple = ("", False)
    params: dict[str, int] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)  # param -> its sweep mark (shown while marked)
    widths: list[tuple[int, int]] = field(default_factory=list)  # (item, width at zoom 1) to scale
    wraps: list[tuple[int, int]] = field(default_factory=list)  # (text, wrap width at zoom 1)


class Canvas:
    def __init__(self, editor: int | str, themes: Themes, textures: Textures, *,
                 on_param: Callable[[str, str, object], None],
                 on_browse: Callable[[str, str, str], None],
                 on_preview_click: Callable[[bytes, str], None]) -> None:
        self.editor = editor
        self.themes = themes
        self.textures = textures
        self.on_param = on_param
        self.on_browse = on_browse
        self.on_preview_click = on_preview_click
        self.nodes: dict[str, NodeItems] = {}
        self.node_ids: dict[int, str] = {}  # dpg node -> model id
        self.pins: dict[int, Pin] = {}  # dpg attribute -> pin
        self.pin_items: dict[tuple[str, str, str], int] = {}
        self.links: dict[int, int] = {}  # model link id -> dpg link
        self.link_ids: dict[int, int] = {}  # dpg link -> model link id
        self.view = View()
        self.grid: dict[str, tuple[float, float]] = {}  # node id -> grid position it is drawn at
        self._fonts: dict[int, int] = {}
        self._font_size = FONT_SIZE

    # ---- building -----------------------------------------------------------------------------
    def sync(self, doc, refresh: set[str] | None = None) -> None:
        """Make the items match the model. `refresh`: nodes whose params/title/position may have
        changed under the canvas (undo/redo, paste); None refreshes every node."""
        g = doc.graph
        model_links = {l.id: l for l in g.links}
        for lid in [l for l in self.links if l not in model_links]:  # links first: see remove_node
            self._remove_link(lid)
        for nid in [n for n in self.nodes if n not in g.nodes or g.nodes[n].type != self.nodes[n].type]:
            self.remove_node(nid)
        for nid in g.nodes:
            if nid not in self.nodes:
                self.build_node(doc, nid)
            elif refresh is None or nid in refresh:
                self.refresh_node(doc, nid)
        for lid, link in model_links.items():
            if lid in self.links:
                item = self.links[lid]
                a1, a2 = dpg.get_item_configuration(item)["attr_1"], dpg.get_item_configuration(item)["attr_2"]
                want = (self.pin_items.get((link.from_node, link.from_output, "out")),
                        self.pin_items.get((link.to_node, link.to_input, "in")))
                if (a1, a2) == want:
                    continue
                self._remove_link(lid)
            self._add_link(link)

    def _add_link(self, link) -> None:
        a = self.pin_items.get((link.from_node, link.from_output, "out"))
        b = self.pin_items.get((link.to_node, link.to_input, "in"))
        if a is None or b is None:
            return  # a link to an unknown node type or socket: validation reports it
        item = dpg.add_node_link(a, b, parent=self.editor)
        theme = self.themes.links.get(self.pins[a].type)
        if theme:
            dpg.bind_item_theme(item, theme)
        self.links[link.id] = item
        self.link_ids[item] = link.id

    def build_node(self, doc, nid: str) -> None:
        node = doc.graph.nodes[nid]
        spec = doc.registry.get(node.type)
        pos = C.node_pos(doc.graph, nid)
        self.grid[nid] = pos
        item = dpg.add_node(label=self._title(node, spec), pos=list(self.view.to_editor(pos)), parent=self.editor)
        parts = NodeItems(node=item, type=node.type)
        self.nodes[nid] = parts
        self.node_ids[item] = nid
        with dpg.node_attribute(attribute_type=dpg.mvNode_Attr_Static, parent=item):
            with dpg.group(horizontal=True):
                about = dpg.add_text(f"#{nid}", color=MUTED_TEXT)
                parts.badge = dpg.add_text("", show=False)
        if spec is None:
            with dpg.node_attribute(attribute_type=dpg.mvNode_Attr_Static, parent=item):
                dpg.add_text(f"unknown node type {node.type!r}", color=ERROR_TEXT, wrap=NODE_WIDTH)
        else:
            with dpg.tooltip(about):  # nodes themselves cannot hold a tooltip
                dpg.add_text(f"{spec.title} ({spec.type} v{spec.version}, {spec.category})")
                dpg.add_text(spec.description, wrap=360, color=MUTED_TEXT)
            for inp in spec.sockets:
                attr = dpg.add_node_attribute(attribute_type=dpg.mvNode_Attr_Input, parent=item,
                                              shape=PIN_SHAPES.get(inp.type, dpg.mvNode_PinShape_CircleFilled))
                label = f"{inp.name}  [{inp.type}{'...' if inp.multi else ''}]{'  (optional)' if inp.optional else ''}"
                t = dpg.add_text(label, parent=attr)
                if inp.tooltip:
                    with dpg.tooltip(t):
                        dpg.add_text(inp.tooltip, wrap=320)
                self._register_pin(attr, Pin(nid, inp.name, "in", inp.type))
            basic = [p for p in spec.params if not p.advanced]
            shown, rest = basic[:PARAMS_SHOWN], basic[PARAMS_SHOWN:] + [p for p in spec.params if p.advanced]
            if shown or rest:
                with dpg.node_attribute(attribute_type=dpg.mvNode_Attr_Static, parent=item) as attr:
                    for p in shown:
                        self._param(doc, nid, p, attr)
                    if rest:
                        # a tree node, not a collapsing header: a header would stretch the node to the window edge
                        with dpg.tree_node(label=f"more ({len(rest)})", default_open=False) as more:
                            for p in rest:
                                self._param(doc, nid, p, more)
            for out in spec.outputs:
                attr = dpg.add_node_attribute(attribute_type=dpg.mvNode_Attr_Output, parent=item,
                                              shape=PIN_SHAPES.get(out.type, dpg.mvNode_PinShape_CircleFilled))
                text = f"{out.name}  [{out.type}]"
                with dpg.group(horizontal=True, parent=attr):  # outputs read right-aligned, by their pins
                    dpg.add_spacer(width=max(0, OUTPUT_RIGHT - CHAR_W * len(text)))
                    dpg.add_text(text)
                self._register_pin(attr, Pin(nid, out.name, "out", out.type))
        with dpg.node_attribute(attribute_type=dpg.mvNode_Attr_Static, parent=item):
            parts.error = dpg.add_text("", color=ERROR_TEXT, wrap=NODE_WIDTH, show=False)
            parts.metrics_parent = dpg.add_group()
            parts.preview = dpg.add_group()
        dpg.bind_item_theme(item, self.themes.node("", False))
        for i in _descendants(item):
            conf = dpg.get_item_configuration(i)
            if conf.get("width", 0) > 0:
                parts.widths.append((i, conf["width"]))
            if conf.get("wrap", 0) > 0:  # messages wrap at the node's width, which zooms too
                parts.wraps.append((i, conf["wrap"]))
        if self.view.zoom != 1.0:
            self._scale_widths(parts)

    def _param(self, doc, nid, inp, parent) -> None:
        node = doc.graph.nodes[nid]
        value = node.params.get(inp.name, inp.default)
        w = add_param_widget(inp, widget_value(inp, value),
                             on_change=lambda name, v: self.on_param(nid, name, v),
                             on_browse=lambda name, kind: self.on_browse(nid, name, kind), parent=parent)
        self.nodes[nid].params[inp.name] = w
        mark = self.nodes[nid].marks[inp.name] = add_sweep_mark(parent)
        values = C.sweep_marks(doc.graph).get(C.sweep_key(nid, inp.name))
        if values:
            show_sweep_mark(mark, w, values if isinstance(values, list) else [values])

    def _register_pin(self, attr: int, pin: Pin) -> None:
        theme = self.themes.pins.get(pin.type)
        if theme:
            dpg.bind_item_theme(attr, theme)
        self.pins[attr] = pin
        self.pin_items[(pin.node, pin.name, pin.side)] = attr

    @staticmethod
    def _title(node, spec) -> str:
        base = spec.title if spec else node.type
        return f"{node.title}  ({base})" if node.title and node.title != base else base

    def remove_node(self, nid: str) -> None:
        """Deletes a node's items, its links first.

        Why links first: Dear PyGui (2.3) segfaults when it deletes a node that still has two or
        more links attached. Deleting the node makes the node editor delete the links touching its
        attributes (mvNodeEditor::onChildRemoved), and it erases each one from the list of links
        it is walking with a range-for: the loop then reads freed memory (not a timing issue: it
        crashes without a viewport too, on the second link). Opening a recipe over another one deleted every node this way, so any
        recipe with a node that has two links (all the presets) crashed the editor; so did Del on
        such a node. With its links gone first, a node deletes alone, which is safe."""
        parts = self.nodes.pop(nid)
        attrs = {item for key, item in self.pin_items.items() if key[0] == nid}
        for lid, item in list(self.links.items()):
            if not dpg.does_item_exist(item):
                self.links.pop(lid)
                self.link_ids.pop(item, None)
                continue
            conf = dpg.get_item_configuration(item)
            if conf["attr_1"] in attrs or conf["attr_2"] in attrs:
                self._remove_link(lid)
        for key in [k for k in self.pin_items if k[0] == nid]:
            self.pins.pop(self.pin_items.pop(key), None)
        self.node_ids.pop(parts.node, None)
        self.grid.pop(nid, None)
        if dpg.does_item_exist(parts.node):
            dpg.delete_item(parts.node)

    def _remove_link(self, lid: int) -> None:
        item = self.links.pop(lid)
        self.link_ids.pop(item, None)
        if dpg.does_item_exist(item):
            dpg.delete_item(item)

    def refresh_node(self, doc, nid: str) -> None:
        node = doc.graph.nodes[nid]
        spec = doc.registry.get(node.type)
        parts = self.nodes[nid]
        dpg.set_item_label(parts.node, self._title(node, spec))
        pos = C.node_pos(doc.graph, nid)
        self.grid[nid] = pos
        want = self.view.to_editor(pos)
        if tuple(round(v) for v in dpg.get_item_pos(parts.node)) != tuple(round(v) for v in want):
            dpg.set_item_pos(parts.node, list(want))
        if spec is None:
            return
        for name, item in parts.params.items():
            inp = spec.input(name)
            value = widget_value(inp, node.params.get(name, inp.default))
            if dpg.get_value(item) != value:
                set_widget_value(item, value)
        self.refresh_marks(doc, nid)

    def refresh_marks(self, doc, nid: str) -> None:
        """Each param's sweep mark as the recipe's ui.sweeps says (after marking, undo, redo)."""
        parts = self.nodes.get(nid)
        if parts is None:
            return
        marks = C.sweep_marks(doc.graph)
        for name, mark in parts.marks.items():
            values = marks.get(C.sweep_key(nid, name))
            show_sweep_mark(mark, parts.params[name], None if values is None else
                            values if isinstance(values, list) else [values])

    def hovered_param(self, nid: str) -> str | None:
        """The param whose field (or sweep mark) is under the mouse, in node `nid`."""
        parts = self.nodes.get(nid)
        if parts is None:
            return None
        for name, item in parts.params.items():
            mark = parts.marks.get(name)
            if dpg.is_item_hovered(item) or (mark and dpg.is_item_shown(mark) and dpg.is_item_hovered(mark)):
                return name
        return None

    # ---- zoom ---------------------------------------------------------------------------------
    def set_view(self, view: View) -> None:
        """Redraw every node at `view` (positions, font, widget widths); the recipe is untouched."""
        old, self.view = self.view, view
        for nid, parts in self.nodes.items():
            grid = self.grid.get(nid) or old.to_grid(dpg.get_item_pos(parts.node))
            dpg.set_item_pos(parts.node, list(view.to_editor(grid)))
            if view.zoom != old.zoom:
                self._scale_widths(parts)
        if view.zoom != old.zoom:
            self._bind_font(font_size_for(view.zoom))
            for parts in self.nodes.values():  # previews and plots are redrawn at the new size
                parts.preview_version = -1
                if parts.metrics is not None:
                    dpg.delete_item(parts.metrics_parent, children_only=True)
                    parts.metrics = None

    def _scale_widths(self, parts: NodeItems) -> None:
        for item, width in parts.widths:
            if dpg.does_item_exist(item):
                dpg.configure_item(item, width=max(1, round(width * self.view.zoom)))
        for item, wrap in parts.wraps:
            if dpg.does_item_exist(item):
                dpg.configure_item(item, wrap=max(20, round(wrap * self.view.zoom)))

    def _bind_font(self, size: int) -> None:
        """The canvas' font at the zoomed size, loaded the first time that size is needed."""
        if size == self._font_size:
            return
        path = font_file()
        if path is None:
            return  # no scalable font on this system: positions and widths still zoom
        if size not in self._fonts:
            try:
                with dpg.font_registry():
                    self._fonts[size] = dpg.add_font(path, size)
            except Exception:
                return
        self._font_size = size
        # bound to the window holding the node editor: a font bound to the editor itself does not
        # reach its nodes
        dpg.bind_item_font(dpg.get_item_parent(self.editor), self._fonts[size])

    def boxes(self) -> list[tuple[float, float, float, float]]:
        """Each node as a grid-space box (x, y, w, h at zoom 1), from its drawn size once it has one."""
        out = []
        for nid, parts in self.nodes.items():
            x, y = self.grid.get(nid, (0.0, 0.0))
            w, h = dpg.get_item_rect_size(parts.node)
            w, h = (w / self.view.zoom, h / self.view.zoom) if w > 0 and h > 0 else DEFAULT_NODE_SIZE
            out.append((x, y, w, h))
        return out

    # ---- reading the view back ----------------------------------------------------------------
    def positions(self) -> dict[str, tuple[float, float]]:
        """Grid-space positions as the user left them (moves at another zoom are scaled back)."""
        out = {}
        for nid, p in self.nodes.items():
            pos = dpg.get_item_pos(p.node)
            drawn = self.grid.get(nid)
            # Dear PyGui keeps whole pixels: within a pixel of where it was put, a node has not moved
            # (at zoom 0.37 a pixel of rounding is almost 3 grid units the recipe must not take)
            if drawn is not None and all(abs(a - b) <= 1.0 for a, b in zip(pos, self.view.to_editor(drawn))):
                out[nid] = drawn
            else:
                out[nid] = self.view.to_grid(pos)
        return out

    def sizes(self) -> dict[str, tuple[float, float]]:
        """Node sizes in grid units."""
        z = self.view.zoom
        return {nid: (w / z, h / z) for nid, (w, h) in
                ((nid, dpg.get_item_rect_size(p.node)) for nid, p in self.nodes.items())}

    def selected_nodes(self) -> list[str]:
        return [self.node_ids[i] for i in dpg.get_selected_nodes(self.editor) if i in self.node_ids]

    def selected_links(self) -> list[int]:
        return [self.link_ids[i] for i in dpg.get_selected_links(self.editor) if i in self.link_ids]

    def hovered_node(self) -> str | None:
        for nid, p in self.nodes.items():
            if dpg.is_item_hovered(p.node):
                return nid
        return None

    def hovered_pin(self) -> Pin | None:
        for attr, pin in self.pins.items():
            if dpg.is_item_hovered(attr):
                return pin
        return None

    def grid_offset(self) -> tuple[float, float] | None:
        """Screen position of editor-space (0, 0), from the drawn nodes (the editor's panning is not
        exposed). Taken from where each node should be, not from Dear PyGui's position of it, and
        the median over the nodes, so a node being dragged does not move the result."""
        xs, ys = [], []
        for nid, p in self.nodes.items():
            rmin = dpg.get_item_rect_min(p.node)
            if nid in self.grid and dpg.is_item_visible(p.node) and rmin != [0, 0]:
                ex, ey = self.view.to_editor(self.grid[nid])
                xs.append(rmin[0] - ex)
                ys.append(rmin[1] - ey)
        if not xs:
            return None
        return sorted(xs)[len(xs) // 2], sorted(ys)[len(ys) // 2]

    def screen_of_grid(self, grid, offset) -> tuple[float, float]:
        e = self.view.to_editor(grid)
        return e[0] + offset[0], e[1] + offset[1]

    def grid_of_screen(self, screen, offset) -> tuple[float, float]:
        return self.view.to_grid((screen[0] - offset[0], screen[1] - offset[1]))

    def text_widget_active(self) -> bool:
        """Whether the user is typing in a node's field (then Del, Space and Ctrl-keys are the field's)."""
        for p in self.nodes.values():
            for item in p.params.values():
                if dpg.is_item_active(item):
                    return True
        return False

    # ---- run state ----------------------------------------------------------------------------
    def set_look(self, nid: str, state: str, focused: bool) -> None:
        parts = self.nodes.get(nid)
        if parts and parts.look != (state, focused):
            parts.look = (state, focused)
            dpg.bind_item_theme(parts.node, self.themes.node(state, focused))

    def set_badge(self, nid: str, text: str) -> None:
        parts = self.nodes.get(nid)
        if parts:
            dpg.set_value(parts.badge, text)
            dpg.configure_item(parts.badge, show=bool(text))

    def set_error(self, nid: str, text: str) -> None:
        parts = self.nodes.get(nid)
        if parts:
            dpg.set_value(parts.error, text)
            dpg.configure_item(parts.error, show=bool(text))

    def update_run(self, nid: str, run: NodeRun) -> None:
        """Metrics plots and previews inside the node; cheap when nothing changed."""
        parts = self.nodes.get(nid)
        if parts is None:
            return
        if run.metrics and parts.metrics is None:
            z = self.view.zoom
            parts.metrics = MetricsView(parts.metrics_parent, width=max(40, round(280 * z)),
                                        height=max(30, round(110 * z)))
        if parts.metrics is not None:
            parts.metrics.update(run)
        if run.preview_version != parts.preview_version:
            parts.preview_version = run.preview_version
            dpg.delete_item(parts.preview, children_only=True)
            for kind, payload in run.previews.items():
                draw_preview(parts.preview, kind, payload, self.textures, compact=True,
                             on_click=self.on_preview_click, scale=self.view.zoom)

    def pin_screen_positions(self) -> dict[str, list[float]]:
        """Where each pin is drawn (for tests that drive the mouse): 'node.name.side' -> [x, y]."""
        out = {}
        for (nid, name, side), attr in self.pin_items.items():
            node = self.nodes[nid].node
            nmin, nsize = dpg.get_item_rect_min(node), dpg.get_item_rect_size(node)
            child = dpg.get_item_children(attr, 1)
            if not child:
                continue
            tmin, tsize = dpg.get_item_rect_min(child[0]), dpg.get_item_rect_size(child[0])
            x = nmin[0] if side == "in" else nmin[0] + nsize[0]
            out[f"{nid}.{name}.{side}"] = [x, tmin[1] + tsize[1] / 2]
        return out


def _descendants(item: int) -> list[int]:
    """A node's items, without its tooltips (windows of their own, drawn at full size)."""
    out = []
    for slot in dpg.get_item_children(item).values():
        for child in slot:
            if dpg.get_item_type(child).endswith("mvTooltip"):
                continue
            out.append(child)
            out.extend(_descendants(child))
    return out
