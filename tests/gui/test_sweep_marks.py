"""Sweep marks on node fields: set through the dialog a right-click on a field opens, shown on the
node, kept in the recipe's ui section, undone like any edit, and queued as the product of their values
(headless Dear PyGui context; the screenshot test runs the editor under Xvfb)."""

import json
import os
import shutil
from pathlib import Path

import dearpygui.dearpygui as dpg
import pytest

from app.engine.queue import RunQueue
from app.gui import commands as C
from app.gui import queue_panel
from app.gui.document import Document
from app.gui.widgets import sweep_mark_text
from tests.experiments_recipe import tiny_recipe


@pytest.fixture
def queue_file(tmp_path, monkeypatch):
    path = tmp_path / "q" / "queue.json"
    monkeypatch.setenv("NODETRAINER_QUEUE", str(path))
    monkeypatch.setenv("NODETRAINER_WORKSPACE", str(tmp_path / "ws"))
    return path


def right_click_menu(editor, nid, hovered):
    """The node's right-click menu as on_right_click builds it, with `hovered` the field under the mouse;
    returns its items by label."""
    editor.canvas.hovered_param = lambda n: hovered if n == nid else None
    editor.canvas.hovered_node = lambda: nid
    before = set(dpg.get_all_items())
    editor.on_right_click(None, None)
    return {dpg.get_item_label(i): i for i in set(dpg.get_all_items()) - before
            if dpg.get_item_type(i).endswith("mvMenuItem")}


def click(item):
    """What Dear PyGui does on a click: the item's callback with as many of (sender, app_data, user_data)
    as it takes."""
    import inspect

    callback = dpg.get_item_callback(item)
    args = (item, None, dpg.get_item_user_data(item))
    callback(*args[:len(inspect.signature(callback).parameters)])


def test_marking_a_field_shows_the_mark_stores_it_undoes_and_queues_the_product(editor, tmp_path, queue_file):
    path = tiny_recipe(tmp_path)
    assert editor.open_path(path)
    items = right_click_menu(editor, "6", "lr")
    click(items["Sweep lr..."])  # right-click on the lr field -> the mark dialog
    dialog_texts = [i for i in dpg.get_all_items() if dpg.get_item_type(i).endswith("mvInputText")
                    and dpg.get_item_label(dpg.get_item_parent(i)).startswith("Sweep Optimizer.lr")]
    assert len(dialog_texts) == 1
    dpg.set_value(dialog_texts[0], "1e-4, 5e-5, 2e-5")
    mark_button = next(i for i in dpg.get_all_items() if dpg.get_item_label(i) == "Mark")
    click(mark_button)
    # the node shows the mark, with the values in its tooltip
    label, tip = sweep_mark_text(editor.canvas.nodes["6"].marks["lr"])
    assert label == "<> sweep: 3 values" and "0.0001, 5e-05, 2e-05" in tip
    assert sweep_mark_text(editor.canvas.nodes["6"].marks["optimizer"]) == ("", "")
    assert editor.doc.graph.ui["sweeps"] == {"6.lr": [0.0001, 5e-05, 2e-05]}
    assert json.loads(editor.doc.dumps())["ui"]["sweeps"] == {"6.lr": [0.0001, 5e-05, 2e-05]}
    # a second mark from the node menu's list of params; a bad value is refused and nothing changes
    items = right_click_menu(editor, "5", None)
    click(items["rank"])
    dialog = queue_panel.SweepMarkDialog(editor, "5", "rank")
    assert dialog.submit("4, 0") is None
    assert "LoRAInject (node 5).rank" in editor.message and "6.lr" in editor.doc.graph.ui["sweeps"]
    assert "5.rank" not in editor.doc.graph.ui["sweeps"]
    assert dialog.submit("2, 4") == [2, 4]
    assert "Edit the sweep of rank..." in right_click_menu(editor, "5", "rank")
    # undo removes the second mark, and the field's label with it; redo brings it back
    editor.undo()
    assert "5.rank" not in editor.doc.graph.ui["sweeps"]
    assert sweep_mark_text(editor.canvas.nodes["5"].marks["rank"]) == ("", "")
    editor.redo()
    assert sweep_mark_text(editor.canvas.nodes["5"].marks["rank"])[0] == "<> sweep: 2 values"
    # Run -> Add to queue queues the product: 2 ranks x 3 learning rates, each a plain recipe
    added = queue_panel.add_to_queue(editor)
    assert len(added) == 6 and len(RunQueue(queue_file).entries()) == 6
    combos = {(e["recipe"]["nodes"]["5"]["params"]["rank"], e["recipe"]["nodes"]["6"]["params"]["lr"])
              for e in added}
    assert combos == {(r, lr) for r in (2, 4) for lr in (0.0001, 5e-05, 2e-05)}
    assert all("sweeps" not in e["recipe"].get("ui", {}) for e in added)
    assert added[0]["workspace"] == str(tmp_path / "ws" / "lr=0.0001,rank=2")  # rank changes slowest
    # undo both marks: the recipe is the file again, byte for byte, without a sweeps key
    editor.undo()
    editor.undo()
    assert "sweeps" not in editor.doc.graph.ui
    assert sweep_mark_text(editor.canvas.nodes["6"].marks["lr"]) == ("", "")
    assert editor.doc.dumps() == Document.open(editor.registry, path).dumps()


def test_edit_and_remove_a_mark_through_the_dialog(editor, tmp_path, queue_file):
    assert editor.open_path(tiny_recipe(tmp_path))
    queue_panel.SweepMarkDialog(editor, "7", "seed").submit("1, 2")
    dialog = queue_panel.SweepMarkDialog(editor, "7", "seed")
    assert dpg.get_value(dialog.text) == "1, 2"  # editing starts from the marked values
    dialog.submit("1, 2, 3")
    assert editor.doc.graph.ui["sweeps"] == {"7.seed": [1, 2, 3]}
    queue_panel.SweepMarkDialog(editor, "7", "seed").remove()
    assert "sweeps" not in editor.doc.graph.ui
    assert sweep_mark_text(editor.canvas.nodes["7"].marks["seed"]) == ("", "")
    assert len(queue_panel.add_to_queue(editor)) == 1  # no marks: one plain run


def test_marks_in_a_recipe_file_load_save_unchanged_and_bad_marks_are_refused_naming_the_file(
        editor, tmp_path, queue_file):
    path = tiny_recipe(tmp_path)
    Document.open(editor.registry, path).save()  # the file as the editor writes it
    plain = path.read_text()
    assert editor.open_path(path)
    editor.save()
    assert path.read_text() == plain and "sweeps" not in plain  # no marks: no key
    data = json.loads(plain)
    data["ui"]["sweeps"] = {"6.lr": [0.001, 0.0005], "9.dtype": ["fp16", "bf16"]}
    path.write_text(json.dumps(data))
    Document.open(editor.registry, path).save()
    marked = path.read_text()
    assert json.loads(marked)["ui"]["sweeps"] == data["ui"]["sweeps"]
    assert editor.open_path(path)
    editor.save()
    assert path.read_text() == marked  # loaded and saved unchanged: the same bytes
    assert sweep_mark_text(editor.canvas.nodes["6"].marks["lr"])[0] == "<> sweep: 2 values"
    assert sweep_mark_text(editor.canvas.nodes["9"].marks["dtype"])[0] == "<> sweep: 2 values"
    # deleting a node takes its marks along; undo puts them back in place
    editor.doc.remove(["9"])
    editor.after_edit()
    assert editor.doc.graph.ui["sweeps"] == {"6.lr": [0.001, 0.0005]}
    editor.undo()
    assert editor.doc.dumps() == Document.open(editor.registry, path).dumps()
    # a mark naming no param of the recipe is refused with the file named; nothing is queued or lost
    data["ui"]["sweeps"]["6.nope"] = [1, 2]
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert editor.open_path(path)
    assert queue_panel.add_to_queue(editor) == []
    assert "'6.nope'" in editor.message and str(path) in editor.message
    assert not queue_file.exists() or RunQueue(queue_file).entries() == []
    assert editor.doc.graph.ui["sweeps"]["6.nope"] == [1, 2]


def test_the_mark_command_keeps_a_recipe_without_marks_free_of_the_key():
    from app.graph.model import Graph

    g = Graph()
    g.ui = {"nodes": {"1": {"pos": [0, 0]}}, "groups": []}
    cmd = C.SetSweep("1", "lr", [1, 2])
    cmd.do(g)
    assert list(g.ui) == ["nodes", "groups", "sweeps"]
    cmd.undo(g)
    assert g.ui == {"nodes": {"1": {"pos": [0, 0]}}, "groups": []}
    C.SetSweep("1", "lr", None).do(g)
    assert "sweeps" not in g.ui
    # removing the last mark of a file that keeps them before its groups: undo puts the key back in place
    g.ui = {"nodes": {}, "sweeps": {"1.lr": [1, 2]}, "groups": []}
    cmd = C.SetSweep("1", "lr", None)
    cmd.do(g)
    assert g.ui == {"nodes": {}, "groups": []}
    cmd.undo(g)
    assert list(g.ui) == ["nodes", "sweeps", "groups"] and g.ui["sweeps"] == {"1.lr": [1, 2]}


from tests.gui.test_gui_xvfb import gui_env, launch, needs_xvfb, pixels, wait_for  # noqa: E402


def _bluish(counts) -> int:
    """Pixels of the mark's light blue, antialiased text included (links of that colour are in both shots)."""
    return sum(n for (r, g, b), n in counts.items() if b > 140 and b - r > 50 and g - r > 30 and r > 80)


@needs_xvfb
def test_a_marked_field_is_drawn_tinted_with_its_mark_in_the_running_editor(display, tmp_path):  # noqa: F811
    """The same recipe with and without a mark on Optimizer.lr: only the marked one has the tinted
    field and the light blue "<> sweep: 3 values" under it."""
    from app.gui.widgets import SWEEP_TINT

    path = tiny_recipe(tmp_path)
    data = json.loads(path.read_text())
    shots = {}
    for name, marks in (("plain", None), ("marked", {"6.lr": [0.001, 0.0005, 0.0002]})):
        if marks:
            data["ui"]["sweeps"] = marks
        path.write_text(json.dumps(data))
        shots[name] = tmp_path / f"{name}.png"
        r = launch(["gui", str(path), "--screenshot", str(shots[name]), "--frames", "4"], gui_env(display, tmp_path))
        assert r.returncode == 0, r.stderr[-2000:]
    out = os.environ.get("NODETRAINER_SHOT_DIR")
    if out:  # to look at the picture
        shutil.copy(shots["marked"], Path(out) / "sweep-mark.png")
    plain, marked = pixels(shots["plain"])[1], pixels(shots["marked"])[1]
    assert plain.get(SWEEP_TINT, 0) == 0 and marked.get(SWEEP_TINT, 0) > 300, "the marked field is not tinted"
    assert _bluish(marked) - _bluish(plain) > 30, "the mark's label is not drawn"


@needs_xvfb
@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed (apt-get install xdotool)")
def test_right_click_on_a_field_marks_it_with_the_mouse_and_keyboard(display, tmp_path):  # noqa: F811
    """The real editor: right-click Optimizer's lr field, pick "Sweep lr...", type the values (spaces
    included: the node search must not take them), Enter, Ctrl+S; the file then carries the mark."""
    import subprocess
    import sys
    import time

    from tests.gui.conftest import ROOT

    path = tiny_recipe(tmp_path)
    env = gui_env(display, tmp_path)
    state_file = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "gui", str(path)], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    xdo = lambda *a: subprocess.run(["xdotool", *map(str, a)], env=env, check=True)  # noqa: E731
    try:
        wait_for(state_file, lambda s: s["pins"])  # opened and fitted
        time.sleep(1)
        x, y = json.loads(state_file.read_text())["canvas"]["node_rects"]["6"][:2]
        field = (int(x + 34), int(y + 51))  # the second param row: lr
        xdo("mousemove", *field)
        time.sleep(0.5)
        xdo("click", 3)
        time.sleep(1)
        xdo("mousemove", field[0] + 30, field[1] + 23)  # the menu's second item, "Sweep lr..."
        time.sleep(0.5)
        xdo("click", 1)
        time.sleep(1)
        xdo("key", "ctrl+a")
        for ch in "1e-4, 5e-5, 2e-5":
            xdo("type", ch)
            time.sleep(0.15)
        time.sleep(0.5)
        xdo("key", "Return")
        time.sleep(1)
        xdo("mousemove", 700, 700)
        xdo("keydown", "ctrl")
        time.sleep(0.3)
        xdo("key", "s")
        time.sleep(0.3)
        xdo("keyup", "ctrl")
        saved = wait_for(None, lambda _: json.loads(path.read_text()).get("ui", {}).get("sweeps"), timeout=10)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert saved == {"6.lr": [0.0001, 5e-05, 2e-05]}
