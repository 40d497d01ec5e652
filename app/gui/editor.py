"""The editor: builds the window and owns every callback. Edits go to the Document as commands,
then the canvas is synced from the model; runs go to the worker and come back as events that
`frame()` folds in once per frame.

Tests drive the same methods the UI calls (on_link, on_delink, add_node, delete_selected, undo,
paste, ...) in a Dear PyGui context with no viewport.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dearpygui.dearpygui as dpg

from app.graph.problems import RecipeError
from app.gui import commands as C
from app.gui import compare_view, dialogs, queue_panel, settings
from app.gui.canvas import Canvas, Pin
from app.gui.document import Document
from app.gui.memory_plan import MemoryPlanPanel
from app.gui.panels import Inspector, Library, ProblemList, SearchPopup, StatusBar
from app.gui.previews import Textures
from app.gui.runner import Runner
from app.gui.runstate import RunState, paths_relative
from app.gui.theme import Themes
from app.gui.view import ZOOM_STEP, fit
from app.gui.widgets import any_text_field_active

AUTOSAVE_EVERY_S = 5.0
LEFT_W, RIGHT_W, STATUS_H = 220, 330, 30
IMGUI_KEY_EQUAL = 602  # ImGuiKey_Equal, which Dear PyGui 2.3 does not name
EDITOR_INSET = (8.0, 8.0)  # where an unpanned node editor puts (0, 0), from its canvas' corner


class Editor:
    def __init__(self, registry, nodes_dirs=(), *, runner: Runner | None = None, autosave: bool = True) -> None:
        self.registry = registry
        self.doc = Document(registry)
        self.runner = runner or Runner(nodes_dirs)
        self.run = RunState()
        self.autosave_enabled = autosave
        self.focus: str | None = None
        self.message = "Double-click the canvas or press Space to add a node."
        self.clipboard: dict | None = None
        self.problems: list = []
        self._validated = -1
        self._autosaved = 0
        self._autosave_t = time.monotonic()
        self._mouse_down = False
        self._drag_pin: Pin | None = None
        self._drag_start = (0.0, 0.0)
        self._pending_pin: Pin | None = None
        self._search_pos = (0.0, 0.0)
        self._looks: dict[str, tuple] = {}
        self.script = None  # a test's scripted menu actions (app/gui/script.py)
        self._fit_pending = 0  # frames left in which to fit the view (node sizes are known after a frame)
        self.frame_times: list[float] = []
        self.build()

    # ---- layout ------------------------------------------------------------------------------------
    def build(self) -> None:
        self.themes = Themes()
        self.textures = Textures()
        with dpg.window(tag="main", no_scrollbar=True) as self.window:
            self._menus()
            with dpg.group(horizontal=True):
                with dpg.child_window(width=LEFT_W, height=-STATUS_H) as left:
                    self.library = Library(left, self.registry, self.add_node_at_centre)
                with dpg.child_window(width=-RIGHT_W, height=-STATUS_H, border=False,
                                      no_scrollbar=True) as self.canvas_box:
                    self.node_editor = dpg.add_node_editor(callback=self.on_link, delink_callback=self.on_delink,
                                                           minimap=True,
                                                           minimap_location=dpg.mvNodeMiniMap_Location_BottomRight,
                                                           width=-1, height=-1)
                with dpg.child_window(width=-1, height=-STATUS_H) as right:
                    self.problem_list = ProblemList(right, self.focus_node)
                    self.inspector = Inspector(right, self.textures, self.enlarge, self.reroll, self.run_to)
                    self.memory = MemoryPlanPanel(self, self.inspector.header)
            self.status = StatusBar(self.window, self.themes)
        dpg.bind_theme(self.themes.app)
        self.canvas = Canvas(self.node_editor, self.themes, self.textures, on_param=self.on_param,
                             on_browse=self.on_browse, on_preview_click=self.enlarge)
        self.search = SearchPopup(self.registry, self.on_search_pick)
        # Groups are drawn in a viewport layer over the canvas: Dear PyGui's node editor has no
        # layer of its own, and what a window draws lies under the editor's child window.
        self.groups_layer = dpg.add_viewport_drawlist(front=True)
        with dpg.handler_registry():
            for key in ("Z", "Y", "C", "V", "D", "S", "O", "N", "G", "Q"):
                dpg.add_key_press_handler(getattr(dpg, f"mvKey_{key}"), callback=self.on_key, user_data=key)
            for key in ("Delete", "Spacebar", "F5", "Escape", "Return", "Back", "F", "Home", "0", "Minus",
                        "Add", "Subtract", "NumPadEqual"):
                if hasattr(dpg, f"mvKey_{key}"):
                    dpg.add_key_press_handler(getattr(dpg, f"mvKey_{key}"), callback=self.on_key, user_data=key)
            # the '=' / '+' key: Dear PyGui 2's mvKey_Plus is a stale code (61) that fires on every key
            dpg.add_key_press_handler(getattr(dpg, "mvKey_Equal", IMGUI_KEY_EQUAL), callback=self.on_key,
                                      user_data="Plus")
            dpg.add_mouse_double_click_handler(button=dpg.mvMouseButton_Left, callback=self.on_double_click)
            dpg.add_mouse_click_handler(button=dpg.mvMouseButton_Left, callback=self.on_click)
            dpg.add_mouse_click_handler(button=dpg.mvMouseButton_Right, callback=self.on_right_click)
            dpg.add_mouse_wheel_handler(callback=self.on_wheel)
        self.update_title()

    def _menus(self) -> None:
        with dpg.menu_bar() as bar:
            with dpg.menu(label="File"):
                dpg.add_menu_item(label="New", shortcut="Ctrl+N", callback=lambda: self.guard(self.new))
                dpg.add_menu_item(label="Open...", shortcut="Ctrl+O", callback=lambda: self.guard(self.open_dialog))
                dpg.add_menu_item(label="Open recipe from a LoRA or PNG...",
                                  callback=lambda: self.guard(lambda: self.open_dialog(outputs=True)))
                dpg.add_menu_item(label="Import OneTrainer or kohya config...",
                                  callback=lambda: self.guard(lambda: queue_panel.import_dialog(self)))
                self.recent_menu = dpg.add_menu(label="Open recent")
                dpg.add_separator()
                dpg.add_menu_item(label="Save", shortcut="Ctrl+S", callback=lambda: self.save())
                dpg.add_menu_item(label="Save as...", callback=lambda: self.save_as())
                dpg.add_separator()
                dpg.add_menu_item(label="Quit", shortcut="Ctrl+Q", callback=lambda: self.request_quit())
            with dpg.menu(label="Edit"):
                dpg.add_menu_item(label="Undo", shortcut="Ctrl+Z", callback=lambda: self.undo())
                dpg.add_menu_item(label="Redo", shortcut="Ctrl+Y", callback=lambda: self.redo())
                dpg.add_separator()
                dpg.add_menu_item(label="Add node...", shortcut="Space", callback=lambda: self.open_search())
                dpg.add_menu_item(label="Copy", shortcut="Ctrl+C", callback=lambda: self.copy_selected())
                dpg.add_menu_item(label="Paste", shortcut="Ctrl+V", callback=lambda: self.paste())
                dpg.add_menu_item(label="Duplicate", shortcut="Ctrl+D", callback=lambda: self.duplicate_selected())
                dpg.add_menu_item(label="Delete", shortcut="Del", callback=lambda: self.delete_selected())
                dpg.add_separator()
                dpg.add_menu_item(label="Group selected...", shortcut="Ctrl+G", callback=lambda: self.group_selected())
                dpg.add_menu_item(label="Rename focused node...", callback=lambda: self.rename_focused())
                self.groups_menu = dpg.add_menu(label="Groups")
            with dpg.menu(label="View"):
                dpg.add_menu_item(label="Fit all", shortcut="F / Home", callback=lambda: self.fit_all())
                dpg.add_menu_item(label="Zoom in", shortcut="Ctrl +  or wheel",
                                  callback=lambda: self.zoom_by(ZOOM_STEP))
                dpg.add_menu_item(label="Zoom out", shortcut="Ctrl -  or wheel",
                                  callback=lambda: self.zoom_by(1 / ZOOM_STEP))
                dpg.add_menu_item(label="Actual size", shortcut="Ctrl 0", callback=lambda: self.zoom_by(None))
                dpg.add_separator()
                dpg.add_menu_item(label="Browse the focused dataset...",
                                  callback=lambda: self.open_dataset_browser(self.focus))
            self.presets_menu = dpg.add_menu(label="Presets")
            with dpg.menu(label="Run"):
                dpg.add_menu_item(label="Run", shortcut="F5", callback=lambda: self.run_graph())
                dpg.add_menu_item(label="Run up to the focused node", callback=lambda: self.run_to(self.focus))
                dpg.add_menu_item(label="Stop", shortcut="Esc", callback=lambda: self.stop())
                dpg.add_separator()
                dpg.add_menu_item(label="Add to queue", callback=lambda: queue_panel.add_to_queue(self))
                dpg.add_menu_item(label="Add sweep to queue...", callback=lambda: queue_panel.SweepDialog(self))
                dpg.add_menu_item(label="Queue...", callback=lambda: queue_panel.open_queue(self))
                dpg.add_menu_item(label="Open a comparison...", callback=lambda: compare_view.open_compare_dialog(self))
                dpg.add_separator()
                dpg.add_menu_item(label="Validate", callback=lambda: self.validate(force=True))
                dpg.add_menu_item(label="Clear the worker's cache", callback=lambda: self.runner.clear_cache())
            dpg.add_spacer(width=30)
            dpg.add_button(label=" Run ", callback=lambda: self.run_graph())
            dpg.add_button(label=" Stop ", callback=lambda: self.stop())
        self._menus_top = [m for m in dpg.get_item_children(bar, 1) if dpg.get_item_type(m).endswith("mvMenu")]
        self._fill_presets()
        self._fill_recent()

    def _fill_presets(self) -> None:
        dpg.delete_item(self.presets_menu, children_only=True)
        for folder, files in settings.preset_files().items():
            dpg.add_text(f"{folder}/", parent=self.presets_menu)
            if not files:
                dpg.add_menu_item(label="  (none yet)", parent=self.presets_menu, enabled=False)
            for f in files:
                dpg.add_menu_item(label=f"  {f.stem}", parent=self.presets_menu, user_data=str(f),
                                  callback=lambda s, a, u: self.guard(lambda: self.open_path(u)))

    def _fill_recent(self) -> None:
        dpg.delete_item(self.recent_menu, children_only=True)
        recent = settings.recent_files()
        if not recent:
            dpg.add_menu_item(label="(none yet)", parent=self.recent_menu, enabled=False)
        for p in recent:
            dpg.add_menu_item(label=p, parent=self.recent_menu, user_data=p,
                              callback=lambda s, a, u: self.guard(lambda: self.open_path(u)))

    def _fill_groups(self) -> None:
        dpg.delete_item(self.groups_menu, children_only=True)
        for i, g in enumerate(self.doc.graph.ui.get("groups", [])):
            with dpg.menu(label=f"{g.get('title', 'Group')}", parent=self.groups_menu):
                dpg.add_menu_item(label="Rename...", user_data=i, callback=lambda s, a, u: self.rename_group(u))
                dpg.add_menu_item(label="Ungroup", user_data=i, callback=lambda s, a, u: self.ungroup(u))

    # ---- documents ----------------------------------------------------------------------------------
    def set_document(self, doc: Document) -> None:
        self.doc = doc
        for nid in list(self.canvas.nodes):
            self.canvas.remove_node(nid)
        self.canvas.sync(doc)
        # a recipe opens framed: once drawn (sizes known), then again at the new zoom until it settles
        self._fit_pending = 4
        self.run = RunState()
        self.focus = None
        self._looks.clear()
        self._validated = -1
        self.validate()
        self._fill_groups()
        self.update_title()

    def new(self) -> None:
        self.set_document(Document(self.registry))
        self.say("New recipe.")

    def open_path(self, path) -> bool:
        try:
            doc = Document.open(self.registry, path)
        except (RecipeError, OSError) as e:
            self.say(str(e), error=True)
            dialogs.message("Cannot open", str(e))
            return False
        self.set_document(doc)
        if doc.path:
            settings.add_recent(doc.path)
            self._fill_recent()
            self.say(f"Opened {doc.path}.")
        else:
            self.say(f"Recovered the recipe embedded in {path}; Save as to keep it.")
        return True

    def open_dialog(self, outputs: bool = False) -> None:
        exts = (".safetensors", ".png") if outputs else (".json",)
        dialogs.file_dialog("Open recipe from output" if outputs else "Open recipe", self.open_path, extensions=exts,
                            default_path=str(self.doc.path.parent if self.doc.path else settings.REPO_ROOT / "graphs"))

    def save(self, then=None) -> None:
        if self.doc.path is None:
            self.save_as(then)
            return
        self._save_to(self.doc.path, then)

    def save_as(self, then=None) -> None:
        dialogs.file_dialog("Save recipe as", lambda p: self._save_to(p, then), save=True,
                            default_path=str(self.doc.path.parent if self.doc.path else settings.REPO_ROOT / "graphs"),
                            default_name=self.doc.path.name if self.doc.path else "my_recipe.json")

    def _save_to(self, path, then=None) -> None:
        try:
            self.doc.save(path)
        except OSError as e:
            self.say(f"Cannot save {path}: {e.strerror or e}", error=True)
            return
        settings.add_recent(self.doc.path)
        settings.clear_autosave()
        self._fill_recent()
        self._fill_presets()
        self.say(f"Saved {self.doc.path}.")
        self.update_title()
        if then:
            then()

    def guard(self, action) -> None:
        """Run `action` now, or after asking what to do with unsaved changes."""
        if not self.doc.dirty:
            action()
            return
        dialogs.choose("Unsaved changes", f"{self.doc.title.rstrip(' *')} has unsaved changes.",
                       [("Save", lambda: self.save(then=action)), ("Discard", action), ("Cancel", None)])

    def request_quit(self) -> None:
        self.guard(dpg.stop_dearpygui)

    def offer_recovery(self) -> None:
        """After a crash: offer the newest autosave left by an editor that is gone."""
        orphans = settings.orphaned_autosaves()
        if not orphans:
            return
        entry = orphans[0]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("saved_at", 0)))
        name = entry.get("path") or "an unsaved recipe"

        def recover():
            try:
                doc = Document.from_text(self.registry, entry["recipe"], "autosave", entry.get("path"))
            except RecipeError as e:
                self.say(f"The autosave cannot be read: {e}", error=True)
                return
            doc.history.mark_unsaved()
            self.set_document(doc)
            for o in orphans:
                settings.discard_autosave(o)
            self.say(f"Recovered {name} as autosaved at {when}.")

        dialogs.choose("Recover unsaved work?",
                       f"NodeTrainer did not close cleanly. Recover {name} as autosaved at {when}?",
                       [("Recover", recover), ("Discard", lambda: [settings.discard_autosave(o) for o in orphans])])

    # ---- edits (the callbacks the canvas and menus use) ------------------------------------------------
    def after_edit(self, refresh: set[str] | None = frozenset()) -> None:
        self.canvas.sync(self.doc, set(refresh) if refresh is not None else None)
        self._fill_groups()
        self.update_title()

    def add_node(self, type_id: str, pos=(40, 40)) -> str:
        nid = self.doc.add_node(type_id, pos)
        self.after_edit()
        self.say(f"Added {self.doc.graph.label(nid)} (node {nid}).")
        return nid

    def add_node_at_centre(self, type_id: str) -> str:
        return self.add_node(type_id, self._grid_at(self._canvas_centre()))

    def on_link(self, sender, app_data) -> int | None:
        a, b = app_data
        pa, pb = self.canvas.pins.get(a), self.canvas.pins.get(b)
        if pa is None or pb is None:
            return None
        if pa.side == pb.side:
            self.say("Link an output (right side) to an input (left side).", error=True)
            return None
        if pa.side == "in":
            pa, pb = pb, pa
        link_id, why = self.doc.connect(pa.node, pa.name, pb.node, pb.name)
        if why:
            self.say(f"Link refused: {why}.", error=True)
            return None
        self.after_edit()
        self.say(f"Linked {self.doc.graph.label(pa.node)}.{pa.name} to {self.doc.graph.label(pb.node)}.{pb.name}.")
        return link_id

    def on_delink(self, sender, link_item) -> None:
        lid = self.canvas.link_ids.get(link_item)
        if lid is not None:
            self.doc.remove(link_ids=[lid])
            self.after_edit()
            self.say("Link removed.")

    def on_param(self, nid: str, name: str, value) -> None:
        if nid in self.doc.graph.nodes:
            self.doc.set_param(nid, name, value)
            self.update_title()

    def on_browse(self, nid: str, name: str, kind: str) -> None:
        def picked(path: str) -> None:
            base = self.doc.path.parent if self.doc.path else Path.cwd()
            try:
                path = os.path.relpath(path, base) if Path(path).is_relative_to(base) else path
            except ValueError:
                pass
            self.doc.set_param(nid, name, path)
            self.after_edit({nid})

        dialogs.file_dialog(f"Choose {name}", picked, folder=kind == "folder",
                            extensions=(".safetensors", ".ckpt", ".txt", ".json", ".png"))

    def delete_selected(self) -> None:
        nodes, links = self.canvas.selected_nodes(), self.canvas.selected_links()
        if not nodes and not links:
            return
        self.doc.remove(nodes, links)
        dpg.clear_selected_nodes(self.node_editor)
        dpg.clear_selected_links(self.node_editor)
        if self.focus in nodes:
            self.focus = None
        self.after_edit()
        self.say(f"Deleted {len(nodes)} node(s) and {len(links)} link(s).")

    def selection(self) -> list[str]:
        sel = self.canvas.selected_nodes()
        return sel or ([self.focus] if self.focus in self.doc.graph.nodes else [])

    def copy_selected(self) -> None:
        ids = self.selection()
        if ids:
            self.clipboard = self.doc.copy(ids)
            try:
                dpg.set_clipboard_text(json.dumps(self.clipboard))
            except Exception:
                pass
            self.say(f"Copied {len(ids)} node(s).")

    def paste(self) -> list[str]:
        if not self.clipboard:
            return []
        new = self.doc.paste(self.clipboard)
        self.clipboard = self.doc.copy(new) if new else self.clipboard  # the next paste lands further on
        self.after_edit(set(new))
        self.say(f"Pasted {len(new)} node(s).")
        return new

    def duplicate_selected(self) -> list[str]:
        ids = self.selection()
        new = self.doc.duplicate(ids) if ids else []
        self.after_edit(set(new))
        if new:
            self.say(f"Duplicated {len(new)} node(s).")
        return new

    def undo(self) -> None:
        cmd = self.doc.history.undo()
        if cmd:
            self.after_edit(cmd.nodes_touched())
            self.say(f"Undid {cmd.label}.")

    def redo(self) -> None:
        cmd = self.doc.history.redo()
        if cmd:
            self.after_edit(cmd.nodes_touched())
            self.say(f"Redid {cmd.label}.")

    def record_moves(self) -> None:
        before = self.doc.history.version
        self.doc.move(self.canvas.positions())
        for nid in self.canvas.grid:
            self.canvas.grid[nid] = C.node_pos(self.doc.graph, nid)
        if self.doc.history.version != before:
            self.update_title()

    def group_selected(self) -> None:
        ids = self.selection()
        if not ids:
            self.say("Select the nodes to group first.", error=True)
            return
        sizes = self.canvas.sizes()
        dialogs.ask_text("Group", "Title of the group:", "Group",
                         lambda title: (self.doc.group(ids, title or "Group", sizes), self.after_edit()))

    def rename_group(self, index: int) -> None:
        from app.gui.commands import EditGroup

        old = self.doc.graph.ui["groups"][index].get("title", "")
        dialogs.ask_text("Rename group", "Title:", old,
                         lambda t: (self.doc.execute(EditGroup(index, t)), self.after_edit()))

    def ungroup(self, index: int) -> None:
        from app.gui.commands import EditGroup

        self.doc.execute(EditGroup(index, None))
        self.after_edit()

    def rename_focused(self) -> None:
        from app.gui.commands import SetTitle

        nid = self.focus
        if nid not in self.doc.graph.nodes:
            self.say("Click a node first.", error=True)
            return
        dialogs.ask_text("Rename node", "Title (empty: the type's name):", self.doc.graph.nodes[nid].title,
                         lambda t: (self.doc.execute(SetTitle(nid, t)), self.after_edit({nid})))

    # ---- search / add ---------------------------------------------------------------------------------
    def open_search(self, screen_pos=None, pin: Pin | None = None) -> None:
        pos = screen_pos or self._mouse_or_centre()
        self._search_pos = pos
        self._pending_pin = pin
        self.search.open(pos, pin.type if pin else None, pin.side if pin else None)

    def on_search_pick(self, type_id: str) -> str:
        pos = self._grid_at(self._search_pos)
        pin, self._pending_pin = self._pending_pin, None
        if pin is None:
            return self.add_node(type_id, pos)
        nid, link = self.doc.add_linked_node(type_id, pos, (pin.node, pin.name, pin.side))
        self.after_edit()
        self.say(f"Added {self.doc.graph.label(nid)}" + (" and linked it." if link else "."))
        return nid

    def _canvas_centre(self):
        try:
            rmin, size = self._canvas_rect()
            return rmin[0] + size[0] / 2 - 100, rmin[1] + size[1] / 2 - 60
        except Exception:
            return 400, 300

    def _canvas_rect(self):
        """Screen rect of the canvas. The node editor reports no position and a child window no
        rect_min; the child window's position is in the main window, which fills the viewport."""
        return dpg.get_item_pos(self.canvas_box), dpg.get_item_rect_size(self.canvas_box)

    def _origin(self) -> tuple[float, float]:
        """Screen position of the node editor's (0, 0): measured from a drawn node, else where an
        unpanned editor puts it."""
        off = self.canvas.grid_offset()
        if off is None:
            rmin = self._canvas_rect()[0]
            off = (rmin[0] + EDITOR_INSET[0], rmin[1] + EDITOR_INSET[1])
        return off

    # ---- zoom and fit -------------------------------------------------------------------------------
    def fit_all(self) -> bool:
        """Frame the whole graph in the canvas (View > Fit all, F or Home; done when a recipe opens)."""
        rmin, size = self._canvas_rect()
        if size[0] <= 0 or size[1] <= 0:
            return False  # not drawn yet (or no viewport)
        off = self._origin()
        area = (rmin[0] - off[0], rmin[1] - off[1], size[0], size[1])
        self.canvas.set_view(fit(self.canvas.boxes(), area))
        return True

    def zoom_by(self, factor: float | None, anchor_screen=None) -> None:
        """Zoom around the mouse (or the canvas centre); None goes back to 1:1."""
        off = self._origin()
        if anchor_screen is None:
            rmin, size = self._canvas_rect()
            anchor_screen = (rmin[0] + size[0] / 2, rmin[1] + size[1] / 2)
        view = self.canvas.view
        anchor = (anchor_screen[0] - off[0], anchor_screen[1] - off[1])
        self.canvas.set_view(view.zoomed(1 / view.zoom if factor is None else factor, anchor))
        self._fit_pending = 0

    def on_wheel(self, sender, app_data) -> None:
        if not app_data or self._overlay_open() or self.canvas.text_widget_active():
            return
        (x0, y0), (w, h) = self._canvas_rect()
        mx, my = dpg.get_mouse_pos(local=False)
        if not (x0 <= mx < x0 + w and y0 <= my < y0 + h):
            return  # the wheel scrolls the side panels as usual
        self.zoom_by(ZOOM_STEP if app_data > 0 else 1 / ZOOM_STEP, tuple(dpg.get_mouse_pos(local=False)))

    def _mouse_or_centre(self):
        if dpg.is_item_hovered(self.node_editor):
            return tuple(dpg.get_mouse_pos(local=False))
        return self._canvas_centre()

    def _grid_at(self, screen_pos) -> tuple[float, float]:
        g = self.canvas.grid_of_screen(screen_pos, self._origin())
        return round(g[0]), round(g[1])

    # ---- input ------------------------------------------------------------------------------------------
    def _typing(self) -> bool:
        return (self.canvas.text_widget_active() or dpg.is_item_active(self.search.query)
                or dpg.is_item_active(self.library.filter) or any_text_field_active())

    def on_key(self, sender, app_data, key: str) -> None:
        ctrl = dpg.is_key_down(dpg.mvKey_LControl) or dpg.is_key_down(dpg.mvKey_RControl)
        if key == "Return" and self.search.shown:
            self.search.pick()
            return
        if key == "Escape":
            if self.search.shown:
                self.search.hide()
            elif self.run.running:
                self.stop()
            return
        if key == "F5":
            self.run_graph()
            return
        browser = getattr(self, "browser", None)
        if browser is not None and dpg.does_item_exist(browser.window) and browser.focused():
            browser.on_key(key, ctrl)  # Delete or Space while editing captions must not touch the graph
            return
        if ctrl and key == "S":
            self.save()
            return
        if self._typing():
            return
        if ctrl:
            zoom_in, zoom_out = lambda: self.zoom_by(ZOOM_STEP), lambda: self.zoom_by(1 / ZOOM_STEP)  # noqa: E731
            {"Z": self.undo, "Y": self.redo, "C": self.copy_selected, "V": self.paste, "D": self.duplicate_selected,
             "O": lambda: self.guard(self.open_dialog), "N": lambda: self.guard(self.new),
             "G": self.group_selected, "Q": self.request_quit, "Plus": zoom_in, "Add": zoom_in,
             "NumPadEqual": zoom_in, "Minus": zoom_out, "Subtract": zoom_out,
             "0": lambda: self.zoom_by(None)}.get(key, lambda: None)()
        elif key in ("F", "Home") and not self.search.shown:
            self.fit_all()
        elif key in ("Delete", "Back") and not self.search.shown:
            self.delete_selected()
        elif key == "Spacebar" and not self.search.shown:
            self.open_search()

    def on_double_click(self, sender, app_data) -> None:
        if dpg.is_item_hovered(self.node_editor) and self.canvas.hovered_node() is None:
            self.open_search(tuple(dpg.get_mouse_pos(local=False)))

    def on_click(self, sender, app_data) -> None:
        nid = self.canvas.hovered_node()
        if nid is not None and nid != self.focus:
            self.focus_node(nid, quiet=True)

    def on_right_click(self, sender, app_data) -> None:
        nid = self.canvas.hovered_node()
        if nid is None:
            return
        self.focus_node(nid, quiet=True)
        field = self.canvas.hovered_param(nid)  # right-click on a field: "Sweep this param..." first
        pos = dpg.get_mouse_pos(local=False)
        with dpg.window(popup=True, pos=[int(pos[0]), int(pos[1])], no_title_bar=True, autosize=True) as menu:
            def do(action):
                dpg.delete_item(menu)
                action()
            dpg.add_menu_item(label="Run up to here", callback=lambda: do(lambda: self.run_to(nid)))
            queue_panel.add_mark_items(self, nid, field, do)
            dpg.add_menu_item(label="Sweep a param into the queue...", callback=lambda: do(lambda: queue_panel.SweepDialog(self)))
            if self.doc.graph.nodes[nid].type == "Concept":
                dpg.add_menu_item(label="Browse dataset...", callback=lambda: do(lambda: self.open_dataset_browser(nid)))
            dpg.add_menu_item(label="Rename...", callback=lambda: do(self.rename_focused))
            dpg.add_menu_item(label="Duplicate", callback=lambda: do(lambda: (self.doc.duplicate([nid]),
                                                                              self.after_edit())))
            dpg.add_menu_item(label="Delete", callback=lambda: do(lambda: (self.doc.remove([nid]), self.after_edit())))

    def open_dataset_browser(self, nid: str | None):
        """The dataset browser over a Concept node's folder (relative paths start at the recipe's folder)."""
        from app.gui.dataset_browser import BrowserModel, DatasetBrowser

        node = self.doc.graph.nodes.get(nid) if nid else None
        if node is None or node.type != "Concept":
            self.say("! Focus a Concept node first (click it), then browse its dataset.", True)
            return None
        folder = str(node.params.get("folder") or "").strip()
        if not folder:
            self.say(f"! Concept node {node.label()} has no folder yet; choose one in its 'folder' param.", True)
            return None
        path = Path(folder).expanduser()
        if not path.is_absolute():
            path = (self.doc.path.parent if self.doc.path else Path.cwd()) / path
        if not path.is_dir():
            self.say(f"! Concept node {node.label()}: the folder {path} does not exist; choose an existing folder.",
                     True)
            return None
        old = getattr(self, "browser", None)
        if old is not None and dpg.does_item_exist(old.window):
            if old.model.dirty:
                dpg.focus_item(old.window)
                self.say(f"! The dataset browser of {old.model.folder} has unsaved edits; save or close it first.",
                         True)
                return old
            old.close(force=True)
        try:
            model = BrowserModel.load(path, delimiter=str(node.params.get("delimiter") or ","),
                                      recursive=bool(node.params.get("recursive", True)))
        except Exception as exc:  # an unreadable folder must not take the editor down
            self.say(f"! Concept node {node.label()}: cannot browse {path}: {exc}", True)
            return None
        self.browser = DatasetBrowser(model, self.textures, title=f"Dataset of {node.label()}: {path}", say=self.say,
                                      on_close=lambda b: setattr(self, "browser", None))
        return self.browser

    def _track_mouse(self) -> None:
        """Link drops on empty canvas and node moves are noticed here (Dear PyGui reports neither)."""
        down = dpg.is_mouse_button_down(dpg.mvMouseButton_Left)
        if down and not self._mouse_down:
            self._drag_pin = self.canvas.hovered_pin()
            self._drag_start = tuple(dpg.get_mouse_pos(local=False))
        elif not down and self._mouse_down:
            pin, self._drag_pin = self._drag_pin, None
            pos = tuple(dpg.get_mouse_pos(local=False))
            moved = abs(pos[0] - self._drag_start[0]) + abs(pos[1] - self._drag_start[1]) > 12
            if pin and moved and self.canvas.hovered_pin() is None and dpg.is_item_hovered(self.node_editor):
                self.open_search(pos, pin)
            elif not pin:
                self.record_moves()
        self._mouse_down = down

    # ---- running ---------------------------------------------------------------------------------------
    def run_graph(self, targets: list[str] | None = None) -> bool:
        if self.run.running or self.runner.starting:
            self.say("A run is in progress; Stop it first.", error=True)
            return False
        self.validate(force=True)
        if self.problems:
            first = next((p.node_id for p in self.problems if p.node_id), None)
            if first:
                self.focus_node(first)
            self.say(f"Fix {len(self.problems)} problem(s) before running (see Problems).", error=True)
            return False
        if not self.doc.graph.nodes:
            self.say("Add some nodes first.", error=True)
            return False
        # absolute: the worker resolves the recipe's relative paths against it from its own folder
        base = self.doc.path.resolve().parent if self.doc.path else Path.cwd()
        stem = self.doc.path.stem if self.doc.path else "untitled"
        workspace = Path(os.environ.get("NODETRAINER_WORKSPACE") or Path("workspace") / stem).resolve()
        self.run.begin()
        self._refresh_looks(set(self.doc.graph.nodes))
        self.runner.start(self.doc.data(), source=str(self.doc.path or "untitled"), recipe_dir=str(base),
                          targets=targets, workspace=str(workspace))
        self.say("Run started." if not targets else f"Running up to node {targets[0]}.")
        return True

    def run_to(self, nid: str | None) -> None:
        if nid not in self.doc.graph.nodes:
            self.say("Click the node to run up to first.", error=True)
            return
        self.run_graph([nid])

    def stop(self) -> None:
        if self.run.running:
            self.runner.cancel()
            self.say("Stopping at the next check...")

    def reroll(self, nid: str) -> None:
        node = self.doc.graph.nodes.get(nid)
        spec = self.doc.spec(nid)
        if node is None or spec is None:
            return
        seed = node.params.get("seed", spec.input("seed").default)
        self.doc.set_param(nid, "seed", int(seed) + 1 if isinstance(seed, int) and seed >= 0 else 1)
        self.after_edit({nid})
        self.run_to(nid)

    # ---- validation and looks ---------------------------------------------------------------------------
    def validate(self, force: bool = False) -> None:
        version = self.doc.history.version
        if not force and version == self._validated:
            return
        self._validated = version
        self.problems = self.doc.problems()
        self.problem_list.show(self.problems)
        self._refresh_looks(set(self.doc.graph.nodes))

    def _refresh_looks(self, nids) -> None:
        by_node: dict[str, list[str]] = {}
        for p in self.problems:
            if p.node_id:
                by_node.setdefault(p.node_id, []).append(p.message)
        for nid in nids:
            if nid not in self.doc.graph.nodes:
                continue
            r = self.run.nodes.get(nid)
            status = r.status if r else ""
            errors = ([r.message] if r and r.status == "error" and r.message else []) + by_node.get(nid, [])
            state = "error" if status == "error" else ("invalid" if by_node.get(nid) else status)
            look = (state, nid == self.focus, r.badge() if r else "", "\n".join(errors))
            if self._looks.get(nid) == look:
                continue
            self._looks[nid] = look
            self.canvas.set_look(nid, state, nid == self.focus)
            self.canvas.set_badge(nid, look[2])
            self.canvas.set_error(nid, look[3])

    def focus_node(self, nid: str | None, quiet: bool = False) -> None:
        """Outline a node and show it in the inspector (Dear PyGui offers no way to select a node
        from code, so the focus is the editor's own)."""
        old, self.focus = self.focus, nid
        self._refresh_looks({n for n in (old, nid) if n})
        if nid and not quiet:
            self.say(f"Node {nid} ({self.doc.graph.label(nid)}) is outlined; its details are in the inspector.")

    def enlarge(self, png: bytes, caption: str) -> None:
        dialogs.enlarge_image(self.textures, png, caption)

    # ---- the frame ---------------------------------------------------------------------------------------
    def frame(self) -> None:
        """Once per rendered frame: never waits on the worker."""
        changed: set[str] = set()
        events = self.runner.poll()
        base = str(self.doc.path.resolve().parent) if events and self.doc.path else None
        for event in events:
            event = paths_relative(event, base)
            changed |= self.run.apply(event)
            kind = event.get("event")
            if kind == "run_done":
                self.say(self.run.message, error=self.run.status not in ("done", "cancelled"))
            elif kind == "node_error":
                self.say(f"node {event.get('node')}: {event.get('message')}", error=True)
            elif kind == "worker_died":
                self.say(self.run.message + " - the next run starts a fresh worker.", error=True)
        if changed:
            self._refresh_looks(changed)
        for nid, r in self.run.nodes.items():
            if nid in self.canvas.nodes and (r.metric_version or r.preview_version):
                self.canvas.update_run(nid, r)
        self.validate()
        if getattr(self, "queue_panel", None) is not None:
            self.queue_panel.tick()  # the run queue window: refreshed once a second while open
        if self._fit_pending and dpg.is_mouse_button_down(dpg.mvMouseButton_Left):
            self._fit_pending = 0  # the user is already working on the view
        if self._fit_pending:
            before = self.canvas.view
            if self.fit_all():
                after = self.canvas.view
                same = abs(after.zoom - before.zoom) < 0.005 * before.zoom and all(
                    abs(a - b) < 1 for a, b in zip(after.shift, before.shift))
                self._fit_pending = 0 if same else self._fit_pending - 1
        self._track_mouse()
        if self.focus and self.focus not in self.doc.graph.nodes:
            self.focus = None
        self.inspector.show(self.doc, self.focus, self.run.nodes.get(self.focus) if self.focus else None)
        self.memory.tick()  # the memory plan on TrainLoop nodes and in the inspector (computed off this thread)
        self._draw_groups()
        self._autosave()
        ft = self.frame_times[-60:]
        fps = f"{1000 * sum(ft) / len(ft):.1f} ms/frame" if ft else ""
        self.status.show(self.run, self.message, f"{len(self.doc.graph.nodes)} nodes   {fps}")
        self.update_title()

    def _draw_groups(self) -> None:
        """Groups are drawn over the canvas (imnodes has no groups): a titled frame per group,
        clipped to the canvas, and not drawn while a menu, popup or dialog is open (the layer is
        above every window). Placed each frame from where the nodes are drawn, so they follow
        panning and zoom. A group is a grid-space rect, or (older files) a list of nodes."""
        dpg.delete_item(self.groups_layer, children_only=True)
        groups = self.doc.graph.ui.get("groups") or []
        if not groups or self._overlay_open():
            return
        box_min, box_size = self._canvas_rect()
        box_max = (box_min[0] + box_size[0], box_min[1] + box_size[1])
        off = self.canvas.grid_offset()
        z = self.canvas.view.zoom
        for g in groups:
            if not isinstance(g, dict):
                continue
            rect = g.get("rect") or g.get("bounding")
            if isinstance(rect, list) and len(rect) == 4 and off is not None:
                x0, y0 = self.canvas.screen_of_grid(rect[:2], off)
                x1, y1 = x0 + rect[2] * z, y0 + rect[3] * z
            else:
                rects = []
                for nid in g.get("nodes", []) if isinstance(g.get("nodes"), list) else []:
                    parts = self.canvas.nodes.get(nid)
                    if parts and dpg.is_item_visible(parts.node):
                        mn, sz = dpg.get_item_rect_min(parts.node), dpg.get_item_rect_size(parts.node)
                        rects.append((mn[0], mn[1], mn[0] + sz[0], mn[1] + sz[1]))
                if not rects:
                    continue
                x0, y0 = min(r[0] for r in rects) - 12 * z, min(r[1] for r in rects) - 30 * z
                x1, y1 = max(r[2] for r in rects) + 12 * z, max(r[3] for r in rects) + 12 * z
            if x1 <= box_min[0] or y1 <= box_min[1] or x0 >= box_max[0] or y0 >= box_max[1]:
                continue
            cx0, cy0 = max(x0, box_min[0]), max(y0, box_min[1])
            cx1, cy1 = min(x1, box_max[0]), min(y1, box_max[1])
            dpg.draw_rectangle((cx0, cy0), (cx1, cy1), color=(220, 200, 110, 220), thickness=2, rounding=6,
                               parent=self.groups_layer)
            size = max(8, round(16 * z))
            title = str(g.get("title", "Group"))
            if y0 >= box_min[1] and x0 >= box_min[0] and x0 + 8 * z + size * 0.6 * len(title) < box_max[0]:
                dpg.draw_text((x0 + 8 * z, y0 + 3 * z), title, size=size, color=(240, 220, 130, 255),
                              parent=self.groups_layer)

    def _overlay_open(self) -> bool:
        """Whether anything is drawn over the canvas: a menu of the menu bar (its state is
        'focused' while open), the search, a popup or a dialog (any other shown window)."""
        if self.search.shown:
            return True
        for menu in self._menus_top:
            if dpg.get_item_state(menu).get("focused"):
                return True
        main = self.window if isinstance(self.window, int) else dpg.get_alias_id(self.window)
        for w in dpg.get_windows():
            kind = dpg.get_item_type(w)
            if w != main and (kind.endswith("mvWindowAppItem") or kind.endswith("mvFileDialog")) \
                    and dpg.is_item_shown(w):
                return True
        return False

    def _autosave(self) -> None:
        if not self.autosave_enabled:
            return
        now = time.monotonic()
        version = self.doc.history.version
        if version == self._autosaved or now - self._autosave_t < AUTOSAVE_EVERY_S:
            return
        self._autosave_t, self._autosaved = now, version
        try:
            if self.doc.dirty:
                settings.write_autosave(self.doc.dumps(), self.doc.path)
            else:
                settings.clear_autosave()
        except OSError:
            pass

    # ---- small things ------------------------------------------------------------------------------------
    def say(self, text: str, error: bool = False) -> None:
        self.message = ("! " if error else "") + text

    def update_title(self) -> None:
        title = f"NodeTrainer - {self.doc.title}"
        if getattr(self, "_title", None) != title:
            self._title = title
            try:
                dpg.set_viewport_title(title)
            except Exception:
                pass  # no viewport (tests)

    def state(self) -> dict:
        """A snapshot for tests and bug reports: the recipe, run state and timings."""
        return {
            "recipe": self.doc.data(),
            "path": str(self.doc.path) if self.doc.path else None,
            "dirty": self.doc.dirty,
            "problems": [p.to_dict() for p in self.problems],
            "message": self.message,
            "focus": self.focus,
            "memory_plan": self.memory.report(),
            "search": {"shown": self.search.shown, "pin_type": self.search.pin_type, "side": self.search.side,
                       "results": [s.type for s in self.search.results[:20]]},
            "run": {"status": self.run.status, "running": self.run.running,
                    "nodes": {nid: {"status": r.status, "metrics": {k: len(v) for k, v in r.metrics.items()},
                                    "previews": sorted(r.previews), "message": r.message}
                              for nid, r in self.run.nodes.items()}},
        }

    def canvas_report(self) -> dict:
        """What the canvas really holds (Dear PyGui's items, not our maps) and what is on screen."""
        kinds = [dpg.get_item_type(i).rsplit("::", 1)[-1]
                 for slot in dpg.get_item_children(self.node_editor).values() for i in slot]
        rmin, size = self._canvas_rect()
        on_screen, rects = [], {}
        for nid, parts in self.canvas.nodes.items():
            mn, sz = dpg.get_item_rect_min(parts.node), dpg.get_item_rect_size(parts.node)
            rects[nid] = [mn[0], mn[1], mn[0] + sz[0], mn[1] + sz[1]]
            if (sz[0] > 0 and mn[0] >= rmin[0] and mn[1] >= rmin[1] and mn[0] + sz[0] <= rmin[0] + size[0]
                    and mn[1] + sz[1] <= rmin[1] + size[1]):
                on_screen.append(nid)
        frames = []
        for item in dpg.get_item_children(self.groups_layer, 2) or []:
            conf = dpg.get_item_configuration(item)
            if "pmin" in conf and "pmax" in conf:
                frames.append([*conf["pmin"][:2], *conf["pmax"][:2]])
        return {"nodes": sorted(self.canvas.nodes), "recipe": sorted(self.doc.graph.nodes),
                "dpg_nodes": kinds.count("mvNode"), "dpg_links": kinds.count("mvNodeLink"),
                "links": len(self.doc.graph.links), "on_screen": sorted(on_screen), "node_rects": rects,
                "group_frames": frames, "canvas_rect": [rmin[0], rmin[1], rmin[0] + size[0], rmin[1] + size[1]],
                "zoom": round(self.canvas.view.zoom, 4), "shift": [round(v, 1) for v in self.canvas.view.shift],
                "origin": self.canvas.grid_offset(), "path": str(self.doc.path) if self.doc.path else None}

    @property
    def fitting(self) -> bool:
        """Whether the view is still being fitted to a recipe just opened."""
        return bool(self._fit_pending)

    def busy(self) -> bool:
        """Whether something will change without input (the render loop must keep drawing)."""
        return bool(self.run.running or self.runner.starting or self._fit_pending
                    or (self.autosave_enabled and self.doc.history.version != self._autosaved))

    def shutdown(self) -> None:
        self.runner.shutdown()
        if self.autosave_enabled:
            settings.clear_autosave()  # a clean exit: the user already chose what to keep
