"""The editor's run queue (Run -> Add to queue / Add sweep to queue... / Queue...) and File -> Import.

The editor puts runs on the same queue file as `launch.py queue add` (app/engine/queue.py) and shows
it: state, progress, ETA and last loss of every entry, refreshed once a second while the window is
open. Entries can be moved, cancelled, resumed from their newest backup, removed, and a finished run's
workspace or recipe opened. "Start the queue" starts `launch.py queue run` as a separate process, so the
queue keeps running when the editor closes; "Compare selected" runs `launch.py compare` the same way
and shows the result (app/gui/compare_view.py).

Dear PyGui (2.3) takes no files dropped from the desktop, so configs of other trainers are imported
with File -> Import... (or `launch.py import`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dearpygui.dearpygui as dpg

from app.gui import dialogs

REFRESH_S = 1.0
LAUNCH = Path(__file__).resolve().parents[2] / "launch.py"


def _workspace_for(editor) -> Path:
    stem = editor.doc.path.stem if editor.doc.path else "untitled"
    return Path(os.environ.get("NODETRAINER_WORKSPACE") or Path("workspace") / stem).resolve()


def add_to_queue(editor, sweeps: list[str] | None = None, queue=None) -> list[dict]:
    """Queue the recipe as it is in the editor (a snapshot: later edits do not change it); with sweeps,
    one entry per combination in sub-workspaces. Without `sweeps` the recipe's sweep marks (ui.sweeps,
    set on the nodes' fields) are the sweep, so Run -> Add to queue queues their product. Returns the
    new entries ([] when refused)."""
    from app.engine.queue import RunQueue
    from app.engine.sweep import complete_recipe, expand, sweep_meta
    from app.graph.overrides import UsageError
    from app.graph.validate import validate

    queue = queue or RunQueue()
    graph = editor.doc.graph
    if not graph.nodes:
        editor.say("Add some nodes first.", error=True)
        return []
    base = editor.doc.path.resolve().parent if editor.doc.path else Path.cwd()
    source = str(editor.doc.path or "untitled")
    root = _workspace_for(editor)
    try:
        if sweeps is None:
            sweeps = editor.doc.sweep_args()
        planned = ([(v.graph, root / v.name, sweep_meta(source, v, [], list(sweeps)), v.sets, v.name)
                    for v in expand(graph, editor.registry, list(sweeps))]
                   if sweeps else [(graph, root, None, [], None)])
    except UsageError as e:
        editor.say(f"Sweep: {e}", error=True)
        return []
    for g, ws, _, _, name in planned:
        problems = validate(g, editor.registry, workspace=ws, recipe_dir=base)
        if problems:
            editor.say(f"{name + ': ' if name else ''}fix {len(problems)} problem(s) before queueing: {problems[0]}",
                       error=True)
            return []
    stem = Path(source).stem
    added = [queue.add(_without_marks(complete_recipe(g, editor.registry, base, meta)), source=source,
                       recipe_dir=str(base), workspace=str(ws), sets=sets, sweep=name,
                       title=f"{stem} {name}" if name else stem)
             for g, ws, meta, sets, name in planned]
    editor.say(f"Queued {len(added)} run(s) (entries {', '.join(str(e['id']) for e in added)}); "
               f"Run -> Queue... shows them.")
    panel = getattr(editor, "queue_panel", None)
    if panel is not None:
        panel.refresh()
    return added


def _without_marks(data: dict) -> dict:
    """A queued run is one combination: its snapshot keeps no sweep marks (meta.sweep says what was
    swept), so opening it from the queue and queueing it again runs that one combination."""
    ui = data.get("ui")
    if isinstance(ui, dict) and "sweeps" in ui:
        del ui["sweeps"]
        if not ui:
            del data["ui"]
    return data


class SweepMarkDialog:
    """Right-click a node's field -> Sweep this param...: the values to sweep it over, typed as for
    `--sweep` (1e-4, 5e-5 or a JSON list), checked against the param's type and range before the mark
    is set. The mark is an undoable edit of the recipe's ui.sweeps; a refused value keeps the dialog
    open with the text as typed."""

    def __init__(self, editor, node_id: str, param: str) -> None:
        from app.engine.sweep import format_value

        self.editor, self.node_id, self.param = editor, node_id, param
        node = editor.doc.graph.nodes[node_id]
        current = editor.doc.sweep_marks().get(f"{node_id}.{param}")
        if isinstance(current, list) and current:
            text = ", ".join(format_value(v) for v in current)
            if any(isinstance(v, str) and "," in v for v in current):
                text = json.dumps(current)
        else:
            text = format_value(node.params.get(param, ""))
        self.window = dpg.add_window(label=f"Sweep {editor.doc.graph.label(node_id)}.{param}", width=600,
                                     height=150, on_close=lambda s: dpg.delete_item(s))
        dpg.add_text(f"Values of {param} to try, separated by commas (a JSON list for values that hold commas).\n"
                     f"Run -> Add to queue then queues one run per combination of the marked values.",
                     parent=self.window)
        self.text = dpg.add_input_text(default_value=text, width=-1, parent=self.window, on_enter=True,
                                       callback=lambda: self.submit())
        dpg.focus_item(self.text)  # type the values straight away; Enter marks
        with dpg.group(horizontal=True, parent=self.window):
            dpg.add_button(label="Mark", callback=lambda: self.submit())
            if current is not None:
                dpg.add_button(label="Remove the mark", callback=lambda: self.remove())

    def submit(self, text: str | None = None) -> list | None:
        """Sets the mark; returns its values, or None when refused (the reason is in the status line)."""
        from app.graph.overrides import UsageError

        text = dpg.get_value(self.text) if text is None else text
        try:
            values = self.editor.doc.sweep_values(self.node_id, self.param, text)
        except UsageError as e:
            self.editor.say(f"Sweep: {e}", error=True)
            return None
        self.editor.doc.mark_sweep(self.node_id, self.param, values)
        self._done(f"{self.editor.doc.graph.label(self.node_id)}.{self.param} is marked to sweep over "
                   f"{len(values)} value(s); Run -> Add to queue queues the combinations.")
        return values

    def remove(self) -> None:
        self.editor.doc.mark_sweep(self.node_id, self.param, None)
        self._done(f"The sweep mark on {self.editor.doc.graph.label(self.node_id)}.{self.param} is removed.")

    def _done(self, message: str) -> None:
        self.editor.after_edit({self.node_id})
        self.editor.say(message)
        if dpg.does_item_exist(self.window):
            dpg.delete_item(self.window)


def add_mark_items(editor, node_id: str, hovered: str | None, do) -> None:
    """The node menu's sweep entries: the field under the mouse first, then every param of the node."""
    spec = editor.doc.spec(node_id)
    if spec is None or not spec.params:
        return
    marks = editor.doc.sweep_marks()
    if hovered:
        verb = "Edit the sweep of" if f"{node_id}.{hovered}" in marks else "Sweep"
        dpg.add_menu_item(label=f"{verb} {hovered}...",
                          callback=lambda: do(lambda: SweepMarkDialog(editor, node_id, hovered)))
    with dpg.menu(label="Sweep a param (mark it)"):
        for p in spec.params:
            mark = " (marked)" if f"{node_id}.{p.name}" in marks else ""
            dpg.add_menu_item(label=p.name + mark, user_data=p.name,
                              callback=lambda s, a, u: do(lambda: SweepMarkDialog(editor, node_id, u)))


class SweepDialog:
    """Run -> Add sweep to queue...: one NODE.PARAM=V1,V2,... per line; the focused node's params are offered."""

    def __init__(self, editor) -> None:
        self.editor = editor
        hint = ""
        node = editor.doc.graph.nodes.get(editor.focus) if editor.focus else None
        if node is not None:
            spec = editor.registry.get(node.type)
            numeric = [p.name for p in spec.params if p.type in ("INT", "FLOAT")][:1] if spec else []
            if numeric:
                hint = f"{node.title or node.type}.{numeric[0]}={node.params.get(numeric[0], '')}"
        self.window = dpg.add_window(label="Add sweep to queue", width=520, height=260,
                                     on_close=lambda s: dpg.delete_item(s))
        dpg.add_text("One swept param per line: NODE.PARAM=VALUE1,VALUE2,... (NODE: title, type or id).\n"
                     "Every combination becomes a queued run in its own sub-workspace; nodes upstream\n"
                     "of every swept param run once for all of them.", parent=self.window)
        self.text = dpg.add_input_text(multiline=True, width=-1, height=110, parent=self.window,
                                       default_value=hint or "Optimizer.lr=1e-4,5e-5\nLoRAInject.rank=8,16")
        dpg.add_button(label="Queue the runs", parent=self.window, callback=lambda: self.submit())

    def submit(self, text: str | None = None) -> list[dict]:
        text = dpg.get_value(self.text) if text is None else text
        sweeps = [line.strip() for line in text.splitlines() if line.strip()]
        if not sweeps:
            self.editor.say("Write at least one NODE.PARAM=VALUE1,VALUE2 line.", error=True)
            return []
        added = add_to_queue(self.editor, sweeps)
        if added and dpg.does_item_exist(self.window):
            dpg.delete_item(self.window)
        return added


class QueuePanel:
    """Run -> Queue...: the queue file's entries, refreshed while open."""

    COLUMNS = ("", "ID", "State", "Run", "Progress", "ETA", "Elapsed", "Loss", "")

    def __init__(self, editor, queue=None) -> None:
        from app.engine.queue import RunQueue

        self.editor = editor
        self.queue = queue or RunQueue()
        self.selected: set[str] = set()
        self._t = 0.0
        self.compare_proc: subprocess.Popen | None = None
        self.compare_out: Path | None = None
        self.window = dpg.add_window(label=f"Run queue - {self.queue.path}", width=900, height=360,
                                     on_close=lambda s: self.close())
        with dpg.group(horizontal=True, parent=self.window):
            dpg.add_button(label="Start the queue", callback=lambda: self.start_runner())
            dpg.add_button(label="Add this recipe", callback=lambda: add_to_queue(self.editor, queue=self.queue))
            dpg.add_button(label="Compare selected", callback=lambda: self.compare_selected())
            dpg.add_button(label="Refresh", callback=lambda: self.refresh())
        self.status = dpg.add_text("", parent=self.window)
        self.table = None
        self.refresh()

    def close(self) -> None:
        if dpg.does_item_exist(self.window):
            dpg.delete_item(self.window)
        if getattr(self.editor, "queue_panel", None) is self:
            self.editor.queue_panel = None

    @property
    def shown(self) -> bool:
        return dpg.does_item_exist(self.window) and dpg.is_item_shown(self.window)

    # ---- drawing -----------------------------------------------------------------------------------
    def refresh(self) -> list[dict]:
        from app.engine.queue import QueueError, describe

        if not dpg.does_item_exist(self.window):
            return []
        try:
            entries = self.queue.entries()
        except QueueError as e:
            dpg.set_value(self.status, str(e))
            return []
        if self.table is not None and dpg.does_item_exist(self.table):
            dpg.delete_item(self.table)
        self.table = dpg.add_table(parent=self.window, header_row=True, resizable=True, borders_innerH=True,
                                   policy=dpg.mvTable_SizingFixedFit, scrollY=True)
        for c in self.COLUMNS:
            dpg.add_table_column(label=c, parent=self.table)
        for i, e in enumerate(entries):
            d = describe(e)
            with dpg.table_row(parent=self.table):
                dpg.add_checkbox(default_value=d["id"] in self.selected, enabled=e["state"] == "done",
                                 user_data=d["id"], callback=lambda s, a, u: self._select(u, a))
                dpg.add_text(d["id"])
                dpg.add_text(d["state"])
                dpg.add_text(d["title"][:40])
                dpg.add_text(d["progress"])
                dpg.add_text(d["eta"])
                dpg.add_text(d["elapsed"])
                dpg.add_text(d["loss"])
                with dpg.group(horizontal=True):
                    dpg.add_button(label="^", user_data=(e["id"], i), callback=lambda s, a, u: self.move(u[0], u[1]))
                    dpg.add_button(label="v", user_data=(e["id"], i + 2),
                                   callback=lambda s, a, u: self.move(u[0], u[1]))
                    if e["state"] in ("queued", "running"):
                        dpg.add_button(label="Cancel", user_data=e["id"], callback=lambda s, a, u: self.cancel(u))
                    if e["state"] in ("interrupted", "cancelled", "failed"):
                        dpg.add_button(label="Resume", user_data=e["id"], callback=lambda s, a, u: self.resume(u))
                    dpg.add_button(label="Outputs", user_data=e["workspace"], callback=lambda s, a, u: open_folder(u))
                    dpg.add_button(label="Recipe", user_data=e["id"], callback=lambda s, a, u: self.open_recipe(u))
                    if e["state"] != "running":
                        dpg.add_button(label="Remove", user_data=e["id"], callback=lambda s, a, u: self.remove(u))
            if d["message"] and e["state"] in ("failed", "interrupted", "cancelled"):
                with dpg.table_row(parent=self.table):
                    dpg.add_text("")
                    dpg.add_text("")
                    dpg.add_text("")
                    dpg.add_text(d["message"][:160], wrap=600)
        running = sum(e["state"] == "running" for e in entries)
        queued = sum(e["state"] == "queued" for e in entries)
        dpg.set_value(self.status, f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {running} running, "
                                   f"{queued} queued. The queue runs in its own process ('Start the queue', or "
                                   f"'launch.py queue run') and goes on when the editor closes.")
        return entries

    def tick(self) -> None:
        """Once per frame from the editor: refresh once a second while open; finish a comparison."""
        if self.compare_proc is not None and self.compare_proc.poll() is not None:
            self._compare_done()
        if not self.shown or time.monotonic() - self._t < REFRESH_S:
            return
        self._t = time.monotonic()
        self.refresh()

    # ---- actions -----------------------------------------------------------------------------------
    def _act(self, fn, *args) -> None:
        from app.engine.queue import QueueError

        try:
            fn(*args)
        except QueueError as e:
            self.editor.say(str(e), error=True)
        self.refresh()

    def _select(self, entry_id: str, on: bool) -> None:
        (self.selected.add if on else self.selected.discard)(str(entry_id))

    def move(self, entry_id, position: int) -> None:
        self._act(self.queue.move, entry_id, max(1, position))

    def cancel(self, entry_id) -> None:
        self._act(self.queue.cancel, entry_id)

    def resume(self, entry_id) -> None:
        self._act(self.queue.resume, entry_id)

    def remove(self, entry_id) -> None:
        self._act(self.queue.remove, entry_id)

    def open_recipe(self, entry_id) -> None:
        """The snapshot that ran (or will run), written beside its outputs, opened in the editor."""
        from app.engine.sweep import RECIPE_NAME, write_recipe

        e = self.queue.get(entry_id)
        path = Path(e["workspace"]) / RECIPE_NAME
        if not path.exists():
            write_recipe(e["recipe"], path)
        self.editor.guard(lambda: self.editor.open_path(path))

    def start_runner(self) -> subprocess.Popen | None:
        from app.engine.queue import QueueError

        try:
            self.queue.take_runner()  # refuses when one is already working on this queue
            self.queue.release_runner()
        except QueueError as e:
            self.editor.say(str(e), error=True)
            return None
        log = self.queue.path.with_name("runner.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as out:
            proc = subprocess.Popen([sys.executable, str(LAUNCH), "queue", "--file",
                                     str(self.queue.path.resolve()), "run"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
        self.editor.say(f"The queue runner started (pid {proc.pid}); its log is {log}.")
        return proc

    def compare_selected(self) -> subprocess.Popen | None:
        entries = [e for e in self.queue.entries() if str(e["id"]) in self.selected and e["state"] == "done"]
        if len(entries) < 2:
            self.editor.say("Tick two or more finished runs to compare them.", error=True)
            return None
        if self.compare_proc is not None and self.compare_proc.poll() is None:
            self.editor.say("A comparison is already being made.", error=True)
            return None
        self.compare_out = (Path("workspace") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        log = self.compare_out.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        self.compare_log = log
        with open(log, "w", encoding="utf-8") as out:
            self.compare_proc = subprocess.Popen([sys.executable, str(LAUNCH), "compare",
                                                  *(e["workspace"] for e in entries),
                                                  "--out", str(self.compare_out)], stdout=out, stderr=subprocess.STDOUT)
        self.editor.say(f"Comparing {len(entries)} runs into {self.compare_out} ...")
        return self.compare_proc

    def _compare_done(self) -> None:
        from app.gui.compare_view import CompareView

        rc, self.compare_proc = self.compare_proc.returncode, None
        if rc != 0:
            tail = self.compare_log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            self.editor.say(f"The comparison failed: {' '.join(tail)} (log: {self.compare_log})", error=True)
            return
        self.editor.compare_view = CompareView(self.editor.textures, self.compare_out)
        self.editor.say(f"Comparison written to {self.compare_out}.")


def open_queue(editor) -> QueuePanel:
    panel = getattr(editor, "queue_panel", None)
    if panel is not None and dpg.does_item_exist(panel.window):
        dpg.focus_item(panel.window)
        panel.refresh()
        return panel
    editor.queue_panel = QueuePanel(editor)
    return editor.queue_panel


def open_folder(path: str) -> None:
    """The system's file manager on a folder (nothing happens where there is none)."""
    opener = {"darwin": ["open"], "win32": ["explorer"]}.get(sys.platform, ["xdg-open"])
    try:
        subprocess.Popen([*opener, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        pass


# ---- File -> Import -------------------------------------------------------------------------------

def detect_kind(path: Path) -> str:
    """onetrainer or kohya, from the file: TOML is kohya; JSON says by its keys."""
    from app.importers import read_config

    if path.suffix.lower() == ".toml":
        return "kohya"
    data = read_config(path)
    if "training_method" in data or "model_type" in data or "concept_file_name" in data:
        return "onetrainer"
    return "kohya"


def import_and_open(editor, path: str | Path) -> Path | None:
    """Write the recipe next to the config (never over an existing file) and open it."""
    from app.atomic import available_path
    from app.importers import ImportError_, import_config

    path = Path(path)
    try:
        kind = detect_kind(path)
        out = available_path(path.with_name(f"{path.stem}_recipe.json"))
        result = import_config(kind, path, output=out, registry=editor.registry)
    except (ImportError_, OSError) as e:
        editor.say(f"Cannot import {path}: {e}", error=True)
        dialogs.message("Cannot import", str(e))
        return None
    if not editor.open_path(out):
        return None
    skipped = len(result.not_imported)
    editor.say(f"Imported {path.name} ({kind}) as {out.name}: {len(result.mapped)} setting(s) mapped, {skipped} not "
               f"imported (listed in the recipe's meta.imported and by 'launch.py import').", error=False)
    return out


def import_dialog(editor) -> int:
    return dialogs.file_dialog("Import a OneTrainer or kohya config", lambda p: import_and_open(editor, p),
                               extensions=(".json", ".toml"), default_path=os.getcwd())
