"""Zoom, fit, long values and the idle render loop: the pure parts, and the editor's side of them
in a Dear PyGui context without a viewport (where nothing has a drawn size)."""

import dearpygui.dearpygui as dpg
import pytest

from app.gui.pacing import Pacer
from app.gui.view import ZOOM_MAX, ZOOM_MIN, View, fit, font_size_for
from app.gui.widgets import path_tail, value_shown
from tests.gui.conftest import ROOT

DEMO = ROOT / "presets" / "tiny_demo.json"


def test_fit_shows_every_box_inside_the_area_centred_and_never_past_one_to_one():
    boxes = [(40, 40, 260, 200), (1600, 40, 260, 200), (40, 480, 260, 300), (1300, 300, 200, 100)]
    area = (-8, -8, 1028, 935)  # editor space: where the canvas' corner is
    view = fit(boxes, area)
    assert 0.4 < view.zoom < 1
    corners = [view.to_editor((x, y)) + view.to_editor((x + w, y + h)) for x, y, w, h in boxes]
    x0, y0 = min(c[0] for c in corners), min(c[1] for c in corners)
    x1, y1 = max(c[2] for c in corners), max(c[3] for c in corners)
    assert x0 >= area[0] and y0 >= area[1] and x1 <= area[0] + area[2] and y1 <= area[1] + area[3]
    assert abs((x0 - area[0]) - (area[0] + area[2] - x1)) < 1  # centred across
    # a small graph is centred at 1:1, not blown up
    small = fit([(0, 0, 200, 100)], area)
    assert small.zoom == 1.0 and small.to_editor((0, 0))[0] > 300
    assert fit([(0, 0, 100000, 100)], area).zoom == ZOOM_MIN


def test_zoom_keeps_the_point_under_the_cursor_and_round_trips():
    view = View(0.8, (30.0, -12.0))
    anchor = (400.0, 250.0)
    under = view.to_grid(anchor)
    for factor in (1.15, 1.15, 1 / 1.15, 10.0, 0.01):
        view = view.zoomed(factor, anchor)
        assert ZOOM_MIN <= view.zoom <= ZOOM_MAX
        assert view.to_grid(anchor) == pytest.approx(under)
    assert view.to_grid(view.to_editor((123.0, -45.0))) == pytest.approx((123.0, -45.0))
    assert font_size_for(1.0) == 13 and font_size_for(0.5) < 8 and font_size_for(2.0) > 20


def test_a_long_path_shows_its_end():
    assert path_tail("demo_data/shapes") == ".../shapes"
    assert path_tail("presets/demo_data/green_shapes") == ".../green_shapes"
    assert path_tail("C:\\data\\sets\\dogs_and_cats") == "...\\dogs_and_cats"
    assert path_tail("short/one") == ""  # fits the field: nothing extra
    assert path_tail("builtin:tiny-sd-xl") == "builtin:tiny-sd-xl"


def test_the_render_loop_waits_only_when_idle_and_wakes_on_input():
    now = [0.0]
    pacer = Pacer(clock=lambda: now[0], awake_s=1.0)
    mouse = ((100, 100), False)
    assert not pacer.frame(mouse, busy=False)  # just started: awake
    now[0] = 0.5
    assert not pacer.frame(mouse, busy=False)
    now[0] = 1.6
    assert pacer.frame(mouse, busy=False)  # a second without input: wait for the next event
    now[0] = 30.0
    assert not pacer.frame(mouse, busy=False)  # the frame that waited was woken by input
    now[0] = 31.5
    assert pacer.frame(mouse, busy=False)
    assert not pacer.frame(((101, 100), False), busy=False)  # the mouse moved
    now[0] = 40.0
    assert not pacer.frame(((101, 100), False), busy=True)  # a run streams events: keep drawing
    assert pacer.frame(((101, 100), False), busy=False)


def test_zoom_is_view_state_the_recipe_and_its_bytes_do_not_change(editor, tmp_path):
    assert editor.open_path(DEMO)
    grid = {nid: editor.doc.graph.ui["nodes"][nid]["pos"] for nid in editor.doc.graph.nodes}
    editor.canvas.set_view(View(0.37, (55.5, -20.25)))
    for nid, parts in editor.canvas.nodes.items():  # drawn at the zoomed place, messages wrapped narrower
        assert dpg.get_item_pos(parts.node) == pytest.approx(editor.canvas.view.to_editor(grid[nid]), abs=1)
        assert dpg.get_item_configuration(parts.error)["wrap"] == round(260 * 0.37)
    editor.record_moves()  # what a click on the canvas does
    assert not editor.doc.dirty
    out = tmp_path / "again.json"
    editor.doc.save(out)
    assert out.read_bytes() == DEMO.read_bytes()
    # a node dragged 50 px to the right at zoom 0.5 moved 100 grid units
    editor.canvas.set_view(View(0.5, (10.0, 10.0)))
    node = editor.canvas.nodes["3"].node
    x, y = dpg.get_item_pos(node)
    dpg.set_item_pos(node, [x + 50, y])
    editor.record_moves()
    assert editor.doc.graph.ui["nodes"]["3"]["pos"] == [grid["3"][0] + 100, grid["3"][1]]
    assert all(editor.doc.graph.ui["nodes"][n]["pos"] == grid[n] for n in grid if n != "3")


def test_text_and_path_fields_show_their_whole_value_and_a_path_its_end(editor):
    assert editor.open_path(DEMO)
    folder = editor.canvas.nodes["3"].params["folder"]
    value = editor.doc.graph.nodes["3"].params["folder"]
    assert value_shown(folder) == (f"value: {value}", path_tail(value)) and path_tail(value).startswith(".../")
    editor.doc.set_param("3", "folder", "/datasets/2024/portraits_of_my_cat")
    editor.after_edit({"3"})
    assert value_shown(folder) == ("value: /datasets/2024/portraits_of_my_cat", ".../portraits_of_my_cat")
    editor.undo()
    assert value_shown(folder) == (f"value: {value}", path_tail(value))


def test_groups_are_not_drawn_while_a_dialog_is_open(editor):
    from app.gui import dialogs

    assert not editor._overlay_open()
    win = dialogs.message("Note", "a dialog over the canvas")
    assert editor._overlay_open()
    dpg.delete_item(win)
    assert not editor._overlay_open()


def test_previews_show_paths_inside_the_recipe_folder_relative_to_it(editor):
    assert editor.open_path(DEMO)
    base = str(DEMO.resolve().parent)
    editor.runner.events = [
        {"event": "run_start", "run_id": "r", "nodes": ["3"]},
        {"event": "preview", "run_id": "r", "node": "3", "kind": "table",
         "title": f"concept 'shapes' ({base}/demo_data/shapes): 8 of 8 images usable",
         "rows": [{"file": f"{base}/demo_data/shapes/a.png"}]},
        {"event": "node_error", "run_id": "r", "node": "3", "message": f"{base}/demo_data/x.png is broken"},
    ]
    editor.frame()
    table = editor.run.nodes["3"].previews["table"]
    assert table["title"] == "concept 'shapes' (demo_data/shapes): 8 of 8 images usable"
    assert table["rows"] == [{"file": "demo_data/shapes/a.png"}]
    assert editor.run.nodes["3"].message == f"{base}/demo_data/x.png is broken"  # errors keep the whole path


def test_a_recipe_opened_by_a_relative_path_runs_with_its_absolute_folder(editor, monkeypatch):
    """The worker resolves the recipe's relative paths from its own folder, not the editor's."""
    monkeypatch.chdir(ROOT)
    assert editor.open_path("tests/gui/recipes/stub_run.json")
    assert editor.run_graph(), editor.message
    _, kw = editor.runner.started[-1]
    assert kw["recipe_dir"] == str(ROOT / "tests" / "gui" / "recipes")


def test_previews_in_nodes_follow_the_zoom(editor):
    from tests.gui.conftest import png_bytes

    assert editor.open_path(DEMO)
    editor.runner.events = [
        {"event": "run_start", "run_id": "r", "nodes": ["3"]},
        {"event": "preview", "run_id": "r", "node": "3", "kind": "images", "images": [png_bytes(size=64)]},
    ]
    editor.frame()

    def thumb_width():
        items, todo = [], [editor.canvas.nodes["3"].preview]
        while todo:
            item = todo.pop()
            if dpg.get_item_type(item).endswith("mvImageButton"):
                items.append(dpg.get_item_configuration(item)["width"])
            todo += [c for slot in dpg.get_item_children(item).values() for c in slot]
        return items[0]

    assert thumb_width() == 56
    editor.canvas.set_view(View(0.5, (0.0, 0.0)))
    editor.frame()
    assert thumb_width() == 28
