"""The editor's callbacks in a Dear PyGui context without a viewport: the same calls the mouse
and keyboard make, checked against the model and the items on the canvas."""

import dearpygui.dearpygui as dpg

from app.gui import commands as C
from tests.gui.conftest import RECIPES, png_bytes


def pin(ed, node, name, side):
    return ed.canvas.pin_items[(node, name, side)]


def link_by_drag(ed, a, out, b, inp):
    """What Dear PyGui's node editor calls when a link is dropped on a pin."""
    return ed.on_link(ed.node_editor, (pin(ed, a, out, "out"), pin(ed, b, inp, "in")))


def test_nodes_and_links_made_through_the_callbacks_appear_on_the_canvas(editor):
    a = editor.add_node("TestConst", (0, 0))
    b = editor.add_node("TestSlow", (300, 0))
    assert set(editor.canvas.nodes) == {a, b}
    link = link_by_drag(editor, a, "out", b, "data")
    assert editor.doc.graph.link(link).to_node == b and link in editor.canvas.links
    assert dpg.get_item_configuration(editor.canvas.links[link])["attr_1"] == pin(editor, a, "out", "out")
    # a drag may start on the input: the link still goes output -> input
    editor.on_delink(editor.node_editor, editor.canvas.links[link])
    assert editor.doc.graph.links == [] and editor.canvas.links == {}
    again = editor.on_link(editor.node_editor, (pin(editor, b, "data", "in"), pin(editor, a, "out", "out")))
    assert editor.doc.graph.link(again).from_node == a


def test_an_incompatible_link_is_refused_with_a_message(editor):
    a = editor.add_node("TestConst", (0, 0))
    u = editor.add_node("TestUse", (300, 0))
    assert link_by_drag(editor, a, "out", u, "buckets") is None
    assert editor.doc.graph.links == [] and editor.canvas.links == {}
    assert editor.message.startswith("!") and "DATASET" in editor.message and "BUCKETS" in editor.message
    inputs = editor.on_link(editor.node_editor, (pin(editor, u, "buckets", "in"), pin(editor, u, "buckets", "in")))
    assert inputs is None


def test_undo_redo_rebuilds_the_canvas_from_the_model(editor):
    a = editor.add_node("TestConst", (0, 0))
    b = editor.add_node("TestAdd", (300, 0))
    link_by_drag(editor, a, "out", b, "items")
    editor.on_param(a, "value", 9)
    editor.doc.remove([a])
    editor.after_edit()
    assert a not in editor.canvas.nodes and not editor.canvas.links
    editor.undo()  # the delete: node, its widgets and its link come back
    assert a in editor.canvas.nodes and len(editor.canvas.links) == 1
    assert dpg.get_value(editor.canvas.nodes[a].params["value"]) == 9
    editor.undo()  # the param
    assert dpg.get_value(editor.canvas.nodes[a].params["value"]) == 1
    editor.redo()
    assert dpg.get_value(editor.canvas.nodes[a].params["value"]) == 9
    for _ in range(3):
        editor.undo()
    assert set(editor.canvas.nodes) == {a} and not editor.canvas.links
    editor.redo()
    editor.redo()
    assert len(editor.canvas.links) == 1


def test_moves_are_undoable(editor):
    a = editor.add_node("TestConst", (10, 20))
    dpg.set_item_pos(editor.canvas.nodes[a].node, [200, 120])  # as a drag leaves it
    editor.record_moves()
    assert C.node_pos(editor.doc.graph, a) == (200, 120)
    editor.undo()
    assert C.node_pos(editor.doc.graph, a) == (10, 20)
    assert tuple(dpg.get_item_pos(editor.canvas.nodes[a].node)) == (10, 20)


def test_copy_paste_and_duplicate_the_focused_node_with_inner_links(editor):
    a = editor.add_node("TestConst", (0, 0))
    b = editor.add_node("TestAdd", (300, 0))
    link_by_drag(editor, a, "out", b, "items")
    editor.focus_node(a)
    editor.copy_selected()
    new = editor.paste()
    assert len(new) == 1 and new[0] in editor.canvas.nodes
    second = editor.paste()  # a second paste lands further on, not on top of the first
    assert C.node_pos(editor.doc.graph, second[0]) != C.node_pos(editor.doc.graph, new[0])
    dup = editor.doc.duplicate([a, b])
    editor.after_edit(set(dup))
    assert len(editor.canvas.nodes) == 6 and len(editor.canvas.links) == 2
    editor.undo()
    assert len(editor.canvas.nodes) == 4


def test_validation_errors_show_on_the_node_and_in_the_list(editor):
    u = editor.add_node("TestUse", (0, 0))
    ok = editor.add_node("TestConst", (300, 0))
    editor.frame()
    parts = editor.canvas.nodes[u]
    assert parts.look[0] == "invalid" and "not connected" in dpg.get_value(parts.error)
    assert dpg.is_item_shown(parts.error)
    assert editor.canvas.nodes[ok].look[0] == "" and not dpg.is_item_shown(editor.canvas.nodes[ok].error)
    listed = dpg.get_item_children(editor.problem_list.body, 1)
    assert len(listed) == 1 and "not connected" in dpg.get_item_label(listed[0])
    # clicking the problem focuses (outlines) its node and shows it in the inspector
    dpg.get_item_callback(listed[0])(listed[0], True, dpg.get_item_user_data(listed[0]))
    assert editor.focus == u and editor.canvas.nodes[u].look == ("invalid", True)
    editor.frame()
    assert editor.inspector.key[0] == u
    # fixing it clears the highlight
    p = editor.add_node("TestPair", (0, 300))
    c = editor.add_node("TestConst", (-300, 300))
    link_by_drag(editor, c, "out", p, "a")
    link_by_drag(editor, p, "second", u, "buckets")
    editor.frame()
    assert editor.canvas.nodes[u].look[0] == "" and not editor.problems


def test_param_widgets_follow_the_spec(editor):
    n = editor.add_node("TestFlag", (0, 0))
    w = editor.canvas.nodes[n].params
    assert dpg.get_item_type(w["flag"]).endswith("mvCheckbox")
    assert dpg.get_item_type(w["mode"]).endswith("mvCombo")
    assert dpg.get_item_configuration(w["mode"])["items"] == ["a", "b"]
    ratio = dpg.get_item_configuration(w["ratio"])
    assert (ratio["min_value"], ratio["max_value"], ratio["min_clamped"]) == (0.0, 1.0, True)
    assert dpg.get_item_type(w["folder"]).endswith("mvInputText")
    s = editor.add_node("Sample", (0, 300))
    seed = editor.canvas.nodes[s].params["seed"]  # 64-bit range: a text field, never clipped
    assert dpg.get_item_type(seed).endswith("mvInputText")
    dpg.get_item_callback(seed)(seed, "9007199254740993", None)
    assert editor.doc.graph.nodes[s].params["seed"] == 9007199254740993


def test_a_run_draws_badges_plots_and_previews_from_events(editor):
    a = editor.add_node("TestConst", (0, 0))
    t = editor.add_node("TestSlow", (300, 0))
    link_by_drag(editor, a, "out", t, "data")
    assert editor.run_graph()
    recipe, kw = editor.runner.started[0]
    assert set(recipe["nodes"]) == {a, t} and kw["targets"] is None
    ev = [{"event": "run_start", "run_id": "r", "nodes": [a, t]},
          {"event": "node_cached", "run_id": "r", "node": a},
          {"event": "node_start", "run_id": "r", "node": t},
          {"event": "progress", "run_id": "r", "node": t, "value": 3, "total": 4},
          {"event": "metric", "run_id": "r", "node": t, "values": {"loss": 0.5, "lr": 1e-4, "step": 3,
                                                                   "steps_per_s": 2.0, "eta_s": 30}},
          {"event": "preview", "run_id": "r", "node": t, "kind": "images", "images": [png_bytes()],
           "captions": ["a red square"]},
          {"event": "preview", "run_id": "r", "node": t, "kind": "histogram", "labels": ["a", "b"],
           "counts": [3, 1], "title": "buckets"}]
    editor.runner.events = ev
    editor.frame()
    assert editor.canvas.nodes[a].look[0] == "cached" and dpg.get_value(editor.canvas.nodes[a].badge) == "cached"
    parts = editor.canvas.nodes[t]
    assert parts.look[0] == "running" and dpg.get_value(parts.badge) == "running 75%"
    assert parts.metrics is not None and "ETA 0:30" in dpg.get_value(parts.metrics.line)
    xs, ys = dpg.get_value(parts.metrics.series["loss"][0])[:2]
    assert list(xs) == [3.0] and list(ys) == [0.5]
    assert dpg.get_item_children(parts.preview, 1)  # thumbnails and the histogram are drawn in the node
    assert len(editor.textures.items) == 1
    assert editor.status.last[0] == 0.875  # 1 cached + 0.75 of 2
    editor.runner.events = [{"event": "node_error", "run_id": "r", "node": t, "message": "the worker process died",
                             "traceback": ""},
                            {"event": "worker_died", "run_id": "r", "message": "the worker process died"},
                            {"event": "run_done", "run_id": "r", "status": "error", "message": "died"}]
    editor.frame()
    assert parts.look[0] == "error" and "died" in dpg.get_value(parts.error)
    assert not editor.run.running
    assert editor.run_graph()  # the editor keeps working: the next run starts (a fresh worker)


def test_run_up_to_a_node_and_stop(editor):
    a = editor.add_node("TestConst", (0, 0))
    editor.add_node("TestConst", (0, 200))
    editor.run_to(a)
    assert editor.runner.started[-1][1]["targets"] == [a]
    editor.run.apply({"event": "run_start", "run_id": "r", "nodes": [a]})
    editor.stop()
    assert editor.runner.cancelled == 1


def test_a_run_is_refused_while_the_recipe_has_problems(editor):
    u = editor.add_node("TestUse", (0, 0))
    assert not editor.run_graph()
    assert editor.runner.started == [] and editor.focus == u and "problem" in editor.message


def test_open_save_and_the_unsaved_guard(editor, tmp_path):
    assert editor.open_path(RECIPES / "stub_run.json")
    assert set(editor.canvas.nodes) == {"1", "2"} and len(editor.canvas.links) == 1
    assert tuple(dpg.get_item_pos(editor.canvas.nodes["2"].node)) == (360, 60)
    ran = []
    editor.guard(lambda: ran.append(1))
    assert ran == [1]  # nothing to lose
    editor.on_param("1", "value", 4)
    editor.guard(lambda: ran.append(2))
    assert ran == [1]  # asked first (a modal is open)
    editor._save_to(tmp_path / "saved.json")
    assert not editor.doc.dirty and (tmp_path / "saved.json").is_file()
    editor.guard(lambda: ran.append(3))
    assert ran == [1, 3]


def test_groups_are_kept_in_the_ui_section(editor):
    a = editor.add_node("TestConst", (0, 0))
    editor.doc.group([a], "Inputs", {a: (200, 100)})
    editor.after_edit()
    assert editor.doc.graph.ui["groups"][0]["title"] == "Inputs"
    editor.frame()  # the group outline is drawn without a viewport too
    editor.undo()
    assert "groups" not in editor.doc.graph.ui
