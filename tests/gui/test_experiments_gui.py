"""The editor's queue, sweep, import and comparison windows, driven through the same methods as
their menu items and buttons (headless Dear PyGui context)."""

import json
import shutil

import dearpygui.dearpygui as dpg
import pytest
from PIL import Image

from app.engine.queue import RunQueue
from app.gui import compare_view, queue_panel
from tests.experiments_recipe import tiny_recipe

FIX = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "import"


@pytest.fixture
def queue_file(tmp_path, monkeypatch):
    path = tmp_path / "q" / "queue.json"
    monkeypatch.setenv("NODETRAINER_QUEUE", str(path))
    monkeypatch.setenv("NODETRAINER_WORKSPACE", str(tmp_path / "ws"))
    return path


def test_add_to_queue_sweep_and_the_queue_window(editor, tmp_path, queue_file):
    assert editor.open_path(tiny_recipe(tmp_path))
    added = queue_panel.add_to_queue(editor)
    assert len(added) == 1 and added[0]["workspace"] == str(tmp_path / "ws")
    editor.focus = "5"  # LoRAInject: the sweep dialog offers its first number param
    dialog = queue_panel.SweepDialog(editor)
    assert dpg.get_value(dialog.text).startswith("LoRAInject.rank=")
    swept = dialog.submit("LoRAInject.rank=2,4\nOptimizer.lr=1e-3")
    assert [e["workspace"].rsplit("/", 1)[1] for e in swept] == ["rank=2,lr=0.001", "rank=4,lr=0.001"]
    assert swept[1]["recipe"]["nodes"]["5"]["params"]["rank"] == 4
    panel = queue_panel.open_queue(editor)
    assert [e["id"] for e in panel.refresh()] == [1, 2, 3]
    panel.move(3, 1)
    panel.cancel(1)
    entries = RunQueue(queue_file).entries()
    assert [(e["id"], e["state"]) for e in entries] == [(3, "queued"), (1, "cancelled"), (2, "queued")]
    assert "cancelled" in [dpg.get_value(c) for c in dpg.get_all_items() if dpg.get_item_type(c).endswith("mvText")]
    # a bad sweep is refused with the reason, nothing queued
    assert queue_panel.SweepDialog(editor).submit("LoRAInject.rank=0,2") == []
    assert "rank" in editor.message and len(RunQueue(queue_file).entries()) == 3


def test_file_import_writes_the_recipe_beside_the_config_and_opens_it(editor, tmp_path):
    config = tmp_path / "kohya_sd15_lora.toml"
    shutil.copy(FIX / "kohya_sd15_lora.toml", config)
    (tmp_path / "kohya_sd15_lora_recipe.json").write_text("{}")  # never overwritten
    out = queue_panel.import_and_open(editor, config)
    assert out == tmp_path / "kohya_sd15_lora_recipe_1.json" and out.is_file()
    assert editor.doc.path == out
    types = sorted(n.type for n in editor.doc.graph.nodes.values())
    assert "LoRAInject" in types and "Cache" in types
    assert "not imported" in editor.message
    assert queue_panel.detect_kind(FIX / "onetrainer_sd15_lora.json") == "onetrainer"
    assert queue_panel.detect_kind(FIX / "kohya_ss_sdxl_lora_gui.json") == "kohya"


def test_compare_view_shows_grid_plot_and_table(editor, tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    Image.new("RGB", (300, 200), "red").save(folder / "grid.png")
    Image.new("RGB", (400, 200), "blue").save(folder / "loss.png")
    (folder / "compare.md").write_text("| run | Optimizer.lr | final loss |\n|---|---|---|\n| a | 0.001 | 0.1 |\n"
                                       "| b | 0.0001 | 0.2 |\n")
    (folder / "compare.json").write_text(json.dumps({"runs": [{"name": "a"}, {"name": "b"}], "prompts": ["x"],
                                                     "seed": 1,
                                                     "grid": str(folder / "grid.png"),
                                                     "loss_plot": str(folder / "loss.png")}))
    view = compare_view.CompareView(editor.textures, folder)
    assert view.images == [str(folder / "grid.png"), str(folder / "loss.png")]
    texts = [dpg.get_value(c) for c in dpg.get_all_items() if dpg.get_item_type(c).endswith("mvText")]
    assert "0.0001" in texts and "b" in texts


from tests.gui.test_gui_xvfb import needs_xvfb, play  # noqa: E402  (the Xvfb editor)


@needs_xvfb
def test_the_menus_queue_show_the_queue_and_import_in_the_running_editor(display, tmp_path, monkeypatch):
    qfile = tmp_path / "queue.json"
    monkeypatch.setenv("NODETRAINER_QUEUE", str(qfile))
    config = tmp_path / "ot.json"
    shutil.copy(FIX / "onetrainer_sd15_finetune.json", config)
    recipe = tiny_recipe(tmp_path)
    steps = [f"File/Open...={recipe}", "Run/Add to queue", "Run/Queue...",
             f"File/Import OneTrainer or kohya config...={config}"]
    records = play(display, tmp_path, steps)
    entries = RunQueue(qfile).entries()
    assert [(e["state"], e["title"]) for e in entries] == [("queued", "demo")]
    imported = json.loads((tmp_path / "ot_recipe.json").read_text())
    assert records[-1]["recipe"] == sorted(imported["nodes"])  # the editor shows the imported recipe
