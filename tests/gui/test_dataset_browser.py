"""The dataset browser: its model (edits, undo, find-and-replace, tags, filters, exclusions, atomic save)
without a window, its Dear PyGui window in a context with no viewport (opened from a Concept node the way
the menus do), and one Xvfb screenshot of it."""

import json
import os
import subprocess
import sys

import dearpygui.dearpygui as dpg
import numpy as np
import pytest
from PIL import Image

from tests.gui.conftest import ROOT
from tests.gui.test_gui_xvfb import needs_xvfb


def make_dataset(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (96, 64), (64, 96), (64, 64), (128, 64), (64, 64)]
    caps = ["ohwx, red circle, plain background", "ohwx, blue square", "ohwx, red square, plain background",
            None, "green circle", "ohwx, red circle"]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"img{i}.png")
        if caps[i % len(caps)] is not None:
            (folder / f"img{i}.txt").write_text(caps[i % len(caps)] + "\n")
    return folder


def model_of(folder):
    from app.gui.dataset_browser import BrowserModel

    return BrowserModel.load(folder)


def test_edits_undo_and_save_round_trip(tmp_path):
    data = make_dataset(tmp_path / "d")
    m = model_of(data)
    assert [e.rel for e in m.entries] == [f"img{i}.png" for i in range(6)]
    assert m.by_rel["img3.png"].caption == "" and not m.by_rel["img3.png"].has_file
    # typing in one caption is one undo step; another caption is another
    m.set_caption("img3.png", "o", typing=True)
    m.set_caption("img3.png", "ohwx, yellow star", typing=True)
    m.set_caption("img0.png", "ohwx, red circle", typing=True)
    assert m.undo() and m.by_rel["img0.png"].caption == "ohwx, red circle, plain background"
    assert m.by_rel["img3.png"].caption == "ohwx, yellow star"
    assert m.undo() and m.by_rel["img3.png"].caption == ""
    assert m.redo() and m.by_rel["img3.png"].caption == "ohwx, yellow star"
    assert not list(data.glob("*.bak")) and not (data / "img3.txt").exists()  # nothing written before Save
    res = m.save()
    assert res.captions == ["img3.png"] and not m.dirty
    assert (data / "img3.txt").read_text() == "ohwx, yellow star\n"
    assert not list(data.glob(".nodetrainer-tmp-*"))
    # a reloaded browser sees what was saved
    assert model_of(data).by_rel["img3.png"].caption == "ohwx, yellow star"


def test_find_replace_across_captions_is_one_undo_step_and_backs_up(tmp_path):
    data = make_dataset(tmp_path / "d")
    m = model_of(data)
    assert m.replace_all("ohwx", "sks") == 4
    assert m.by_rel["img1.png"].caption == "sks, blue square"
    assert m.replace_all(r"(red|blue) (\w+)", r"\2 in \1", regex=True) == 4
    assert m.by_rel["img0.png"].caption == "sks, circle in red, plain background"
    assert m.replace_all("PLAIN", "white", case=False, rels=["img0.png"]) == 1
    assert m.by_rel["img2.png"].caption.endswith("plain background")  # only the rels given
    m.undo()
    m.undo()
    assert m.by_rel["img0.png"].caption == "sks, red circle, plain background"
    m.undo()
    assert m.by_rel["img0.png"].caption == "ohwx, red circle, plain background" and not m.dirty
    m.redo()
    res = m.save()
    assert sorted(res.captions) == ["img0.png", "img1.png", "img2.png", "img5.png"]
    assert (data / "img1.txt").read_text() == "sks, blue square\n"
    assert (data / "img1.txt.bak").read_text() == "ohwx, blue square\n"  # the user's text is never lost
    assert not (data / "img4.txt.bak").exists()  # an untouched caption is not rewritten


def test_tags_filters_and_exclusions_the_concept_honours(tmp_path):
    from app.ml.data.concept import ConceptSettings, scan_concept
    from app.gui.dataset_browser import Filter

    data = make_dataset(tmp_path / "d")
    m = model_of(data)
    tags = dict(m.tags())
    assert tags["ohwx"] == 4 and tags["plain background"] == 2 and tags["green circle"] == 1
    assert m.tags()[0] == ("ohwx", 4)
    assert [e.rel for e in m.visible(Filter(missing_only=True))] == ["img3.png"]
    assert [e.rel for e in m.visible(Filter(tag="plain background"))] == ["img0.png", "img2.png"]
    assert [e.rel for e in m.visible(Filter(min_words=4))] == ["img0.png", "img2.png"]
    assert [e.rel for e in m.visible(Filter(max_words=2, min_words=1))] == ["img4.png"]
    wide = m.by_rel["img4.png"].bucket
    assert [e.rel for e in m.visible(Filter(bucket=wide))] == ["img4.png"]
    assert dict(m.buckets())[m.by_rel["img0.png"].bucket] == 3
    assert m.by_rel["img0.png"].bucket == "512x512"
    m.set_resolution(1024)
    assert m.by_rel["img0.png"].bucket == "1024x1024" and len(m.visible(Filter(bucket="1024x1024"))) == 3
    m.set_resolution(512)
    m.set_excluded("img1.png", True)
    m.set_excluded("img4.png", True)
    assert "green circle" not in dict(m.tags())
    assert "img1.png" not in [e.rel for e in m.visible(Filter(show_excluded=False))]
    m.undo()
    assert not m.by_rel["img4.png"].excluded
    assert m.save().ignore_written
    c = scan_concept(ConceptSettings(name="c", folder=data))
    assert sorted(s.rel for s in c.samples) == [f"img{i}.png" for i in (0, 2, 3, 4, 5)]
    m2 = model_of(data)
    assert m2.by_rel["img1.png"].excluded and not m2.dirty
    m2.set_excluded("img1.png", False)
    m2.save()
    assert len(scan_concept(ConceptSettings(name="c", folder=data)).samples) == 6


def test_an_emptied_caption_is_moved_aside_not_deleted(tmp_path):
    data = make_dataset(tmp_path / "d")
    m = model_of(data)
    m.set_caption("img4.png", "   ")
    res = m.save()
    assert res.removed == ["img4.png"] and not (data / "img4.txt").exists()
    assert (data / "img4.txt.bak").read_text() == "green circle\n"


def test_a_caption_edit_re_encodes_exactly_that_caption_in_the_text_cache(tmp_path):
    from app.ml.data.cache import TextCache
    from app.ml.data.concept import ConceptSettings, scan_concept

    data = make_dataset(tmp_path / "d")

    def captions():
        return sorted({s.caption_lines[0] for s in scan_concept(ConceptSettings(name="c", folder=data)).samples})

    enc = lambda texts: [np.zeros(2, np.float32) for _ in texts]  # noqa: E731
    cache = TextCache(tmp_path / "cache", "enc")
    cache.get_or_encode(captions(), enc)
    first = cache.misses
    m = model_of(data)
    m.set_caption("img1.png", "ohwx, blue square, edited")
    m.save()
    cache = TextCache(tmp_path / "cache", "enc")
    cache.get_or_encode(captions(), enc)
    assert (cache.misses, cache.hits) == (1, first - 1)


# ---- the window, in a Dear PyGui context without a viewport -------------------------------------------

def test_the_browser_opens_from_a_concept_node_and_edits_round_trip(editor, tmp_path):
    data = make_dataset(tmp_path / "d", 30)
    other = editor.add_node("TestConst", (0, 0))
    assert editor.open_dataset_browser(other) is None and editor.message.startswith("!")
    nid = editor.add_node("Concept", (0, 0))
    editor.on_param(nid, "folder", str(data))
    b = editor.open_dataset_browser(nid)
    assert b is not None and editor.browser is b
    rep = b.report()
    assert len(rep["shown"]) == 24 and rep["tags"][0] == "ohwx"  # one page of cards
    b.go(1)
    assert len(b.report()["shown"]) == 6
    b.go(-1)
    # typing in a card goes through its callback to the model
    card = b.cards["img1.png"]["caption"]
    dpg.get_item_callback(card)(card, "ohwx, blue square, big", "img1.png")
    assert b.model.by_rel["img1.png"].caption == "ohwx, blue square, big" and b.model.dirty
    b.undo()
    assert dpg.get_value(b.cards["img1.png"]["caption"]) == "ohwx, blue square"
    b.redo()
    # find and replace acts on the shown captions only
    dpg.set_value(b.f_missing, False)
    dpg.set_value(b.f_text, "square")
    b._filter_changed()
    assert all("square" in c for c in b.report()["captions"].values())
    dpg.set_value(b.find, "square")
    dpg.set_value(b.repl, "box")
    assert b.replace() == 10
    assert b.model.by_rel["img0.png"].caption == "ohwx, red circle, plain background"
    dpg.set_value(b.f_text, "")
    b._filter_changed()
    dpg.set_value(b.f_res, "1024")
    b._resolution_changed()
    assert "1024x1024 (15)" in dpg.get_item_configuration(b.f_bucket)["items"]
    dpg.set_value(b.f_bucket, "1024x1024 (15)")
    b._filter_changed()
    assert len(b.report()["shown"]) == 15
    dpg.set_value(b.f_bucket, "all")
    b._filter_changed()
    b.set_tag_filter("green circle")
    assert b.report()["shown"] == [f"img{i}.png" for i in range(30) if i % 6 == 4]
    chk = b.cards["img4.png"]["exclude"]
    dpg.get_item_callback(chk)(chk, True, "img4.png")
    assert b.save()
    assert (data / "img1.txt").read_text() == "ohwx, blue box, big\n"
    assert (data / ".nodetrainer-ignore").read_text().splitlines()[1:] == ["img4.png"]
    assert "captions saved" in editor.message and not b.model.dirty
    # closing with unsaved edits asks first; nothing is lost
    b.edit_caption("img0.png", "changed")
    b.close()
    assert dpg.does_item_exist(b.window) and editor.browser is b
    b.close(force=True)
    assert not dpg.does_item_exist(b.window) and editor.browser is None


def test_a_concept_without_a_usable_folder_says_so(editor, tmp_path):
    nid = editor.add_node("Concept", (0, 0))
    assert editor.open_dataset_browser(nid) is None and "no folder" in editor.message
    editor.on_param(nid, "folder", str(tmp_path / "nope"))
    assert editor.open_dataset_browser(nid) is None and "does not exist" in editor.message


# ---- Xvfb: the real window, drawn ------------------------------------------------------------------------

@needs_xvfb
def test_screenshot_of_the_browser(display, tmp_path):
    make_dataset(tmp_path / "data", 9)
    recipe = tmp_path / "browse.json"
    recipe.write_text(json.dumps({
        "format_version": 1,
        "nodes": {"c": {"type": "Concept", "version": 1, "params": {"folder": "data"}}},
        "links": [], "ui": {"nodes": {"c": {"pos": [40, 40]}}}}))
    shot = tmp_path / "browser.png"
    env = dict(os.environ, DISPLAY=display, NODETRAINER_CONFIG=str(tmp_path / "config"),
               NODETRAINER_WORKSPACE=str(tmp_path / "ws"), NODETRAINER_GUI_BROWSE="c",
               NODETRAINER_GUI_DUMP=str(tmp_path / "state.json"))
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "gui", str(recipe), "--screenshot", str(shot),
                          "--frames", "12"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["browser"]["shown"]) == 9 and state["browser"]["tags"][0] == "ohwx"
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # drawn, not blank
    keep = os.environ.get("NODETRAINER_KEEP_SCREENSHOT")
    if keep:
        import shutil

        shutil.copy(shot, keep)


def test_keys_while_the_browser_has_the_focus_never_touch_the_graph(editor, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d")
    nid = editor.add_node("Concept", (0, 0))
    editor.on_param(nid, "folder", str(data))
    b = editor.open_dataset_browser(nid)
    b.edit_caption("img0.png", "edited")
    monkeypatch.setattr(editor.canvas, "selected_nodes", lambda: [nid])  # the Concept node is selected
    monkeypatch.setattr(b, "focused", lambda: True)
    for key in ("Delete", "Back", "Spacebar", "F"):
        editor.on_key(None, None, key)
    assert nid in editor.doc.graph.nodes and not editor.search.shown
    monkeypatch.setattr(dpg, "is_key_down", lambda k: k == dpg.mvKey_LControl)
    editor.on_key(None, None, "Z")  # undoes the caption edit, not the graph's last edit
    assert b.model.by_rel["img0.png"].caption == "ohwx, red circle, plain background"
    assert editor.doc.graph.nodes[nid].params["folder"] == str(data)
    editor.on_key(None, None, "Y")
    editor.on_key(None, None, "S")  # saves the dataset, not the recipe
    assert (data / "img0.txt").read_text() == "edited\n" and editor.doc.path is None
    monkeypatch.setattr(b, "focused", lambda: False)
    monkeypatch.setattr(dpg, "is_key_down", lambda k: False)
    editor.on_key(None, None, "Delete")
    assert nid not in editor.doc.graph.nodes  # with the focus on the canvas, keys act on the graph again


@needs_xvfb
def test_typing_a_caption_under_xvfb_edits_it_and_leaves_the_graph_alone(display, tmp_path):
    """Real keys into a caption field: Space and Backspace type text (they must not open the node search
    or delete the selected node), Ctrl+S saves the caption file."""
    import shutil
    import signal
    import time

    if shutil.which("xdotool") is None:
        pytest.skip("xdotool is not installed")
    from tests.gui.test_gui_xvfb import wait_for

    make_dataset(tmp_path / "data", 3)
    recipe = tmp_path / "browse.json"
    recipe.write_text(json.dumps({
        "format_version": 1,
        "nodes": {"c": {"type": "Concept", "version": 1, "params": {"folder": "data"}}},
        "links": [], "ui": {"nodes": {"c": {"pos": [40, 40]}}}}))
    state_file = tmp_path / "state.json"
    env = dict(os.environ, DISPLAY=display, NODETRAINER_CONFIG=str(tmp_path / "config"),
               NODETRAINER_WORKSPACE=str(tmp_path / "ws"), NODETRAINER_GUI_BROWSE="c",
               NODETRAINER_GUI_DUMP=str(state_file))
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "gui", str(recipe)], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    xdo = lambda *a: subprocess.run(["xdotool", *map(str, a)], env=env, check=True)  # noqa: E731
    try:
        at = wait_for(state_file, lambda s: (s.get("browser") or {}).get("caption_at", {}).get("img1.png"))
        if at[0] <= 0:  # not laid out yet
            time.sleep(1)
            at = json.loads(state_file.read_text())["browser"]["caption_at"]["img1.png"]
        xdo("mousemove", int(at[0]), int(at[1]))
        time.sleep(0.3)
        xdo("click", 1)
        time.sleep(0.3)
        xdo("key", "ctrl+End")
        xdo("type", "--delay", "40", " bigX")
        xdo("key", "BackSpace")
        state = wait_for(state_file, lambda s: s if s["browser"]["captions"]["img1.png"].endswith(" big") else None)
        assert state["browser"]["dirty"] and list(state["recipe"]["nodes"]) == ["c"]
        assert not state["search"]["shown"]
        xdo("keydown", "ctrl")  # held as a hand holds it: the key callback runs a frame later
        time.sleep(0.3)
        xdo("key", "s")
        time.sleep(0.5)
        xdo("keyup", "ctrl")
        wait_for(state_file, lambda s: not s["browser"]["dirty"] or None)
        assert (tmp_path / "data" / "img1.txt").read_text() == "ohwx, blue square big\n"
        assert (tmp_path / "data" / "img1.txt.bak").read_text() == "ohwx, blue square\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
