"""The editing rules and undo history, without any window: what a user notices when they draw a
link, undo, paste or save."""

from app.gui import commands as C
from app.gui.document import Document, clipboard_from_text, clipboard_text
from app.graph.recipe import dumps_recipe, loads_recipe


def doc_with(reg, *types):
    doc = Document(reg)
    ids = [doc.add_node(t, (i * 300, 0)) for i, t in enumerate(types)]
    return doc, ids


def test_every_edit_undoes_back_to_identical_bytes(gui_registry):
    doc, (a, b, c) = doc_with(gui_registry, "TestConst", "TestAdd", "TestSlow")
    doc.connect(a, "out", b, "items")
    doc.history.mark_saved()
    before = doc.dumps()
    doc.set_param(a, "value", 7)
    doc.connect(b, "out", c, "data")
    doc.move({a: (55, 66)})
    doc.group([a, b], "Data", {a: (200, 100), b: (200, 100)})
    doc.remove([b])
    doc.execute(C.SetTitle(c, "slow one"))
    assert doc.dirty and doc.dumps() != before
    while doc.history.can_undo and doc.dirty:
        doc.history.undo()
    assert doc.dumps() == before and not doc.dirty
    while doc.history.can_redo:
        doc.history.redo()
    g = doc.graph
    assert set(g.nodes) == {a, c} and g.nodes[a].params["value"] == 7 and g.nodes[c].title == "slow one"
    assert C.node_pos(g, a) == (55, 66) and g.ui["groups"][0]["title"] == "Data"


def test_delete_then_undo_restores_node_ids_links_and_their_order(gui_registry):
    doc, (a, b, c) = doc_with(gui_registry, "TestConst", "TestConst", "TestAdd")
    doc.connect(a, "out", c, "items")
    doc.connect(b, "out", c, "items")
    before = doc.dumps()
    doc.remove([a])
    assert [l.from_node for l in doc.graph.links] == [b]
    doc.history.undo()
    assert doc.dumps() == before


def test_incompatible_link_is_refused_with_the_reason(gui_registry):
    doc, (a, u) = doc_with(gui_registry, "TestConst", "TestUse")
    steps = len(doc.history.done)
    link, why = doc.connect(a, "out", u, "buckets")
    assert link is None and "DATASET" in why and "BUCKETS" in why
    assert doc.graph.links == [] and len(doc.history.done) == steps


def test_cycles_and_self_links_are_refused(gui_registry):
    doc, (a, b) = doc_with(gui_registry, "TestAdd", "TestAdd")
    assert doc.connect(a, "out", b, "items")[1] is None
    assert "cycle" in doc.connect(b, "out", a, "items")[1]
    assert "itself" in doc.connect(a, "out", a, "items")[1]


def test_a_second_link_into_a_single_input_replaces_the_first_in_one_undo_step(gui_registry):
    doc, (a, b, s) = doc_with(gui_registry, "TestConst", "TestConst", "TestSlow")
    first, _ = doc.connect(a, "out", s, "data")
    second, _ = doc.connect(b, "out", s, "data")
    assert [l.id for l in doc.graph.links_into(s, "data")] == [second]
    doc.history.undo()
    assert [l.id for l in doc.graph.links_into(s, "data")] == [first]


def test_multi_inputs_take_several_links(gui_registry):
    doc, (a, b, add) = doc_with(gui_registry, "TestConst", "TestConst", "TestAdd")
    doc.connect(a, "out", add, "items")
    doc.connect(b, "out", add, "items")
    assert len(doc.graph.links_into(add, "items")) == 2


def test_copy_paste_brings_inner_links_only_with_fresh_ids(gui_registry):
    doc, (a, b, c) = doc_with(gui_registry, "TestConst", "TestAdd", "TestSlow")
    doc.connect(a, "out", b, "items")
    doc.connect(b, "out", c, "data")
    doc.set_param(a, "value", 42)
    clip = clipboard_from_text(clipboard_text(doc.copy([a, b])))
    new = doc.paste(clip)
    assert len(new) == 2 and not set(new) & {a, b, c}
    na, nb = new
    assert doc.graph.nodes[na].params["value"] == 42
    assert [(l.from_node, l.to_node) for l in doc.graph.links if l.to_node in new] == [(na, nb)]
    assert C.node_pos(doc.graph, na) == (C.node_pos(doc.graph, a)[0] + 40, C.node_pos(doc.graph, a)[1] + 40)
    doc.history.undo()  # a paste is one step
    assert set(doc.graph.nodes) == {a, b, c}


def test_dropping_a_link_on_empty_canvas_adds_a_linked_node(gui_registry):
    doc, (a,) = doc_with(gui_registry, "TestConst")
    nid, link = doc.add_linked_node("TestSlow", (300, 0), (a, "out", "out"))
    assert doc.graph.link(link).to_node == nid and doc.graph.link(link).to_input == "data"
    doc.history.undo()
    assert set(doc.graph.nodes) == {a} and doc.graph.links == []
    # from an input: the new node's matching output feeds it
    doc2, (s,) = doc_with(gui_registry, "TestSlow")
    nid, link = doc2.add_linked_node("TestConst", (0, 0), (s, "data", "in"))
    assert (doc2.graph.link(link).from_node, doc2.graph.link(link).to_node) == (nid, s)


def test_typing_in_a_field_is_one_undo_step(gui_registry):
    doc, (a,) = doc_with(gui_registry, "TestConst")
    for v in (1, 12, 123):
        doc.set_param(a, "tag", str(v))
    doc.history.undo()
    assert "tag" not in doc.graph.nodes[a].params


def test_saving_marks_clean_and_editing_after_save_marks_dirty(gui_registry, tmp_path):
    doc, (a,) = doc_with(gui_registry, "TestConst")
    doc.set_param(a, "tag", "x")
    doc.save(tmp_path / "r.json")
    assert not doc.dirty
    doc.set_param(a, "tag", "xy")  # must not merge into the saved step
    assert doc.dirty
    doc.history.undo()
    assert not doc.dirty
    again, problems = loads_recipe((tmp_path / "r.json").read_text(), "r", gui_registry)
    assert dumps_recipe(again) == (tmp_path / "r.json").read_text() and not problems
