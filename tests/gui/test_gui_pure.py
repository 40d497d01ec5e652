"""Pure editor helpers: recipes embedded in outputs, search, run state, settings."""

import json
import os
import struct
import zlib

import pytest

from app.graph.problems import RecipeError
from app.gui import settings
from app.gui.document import Document
from app.gui.embedded import read_recipe_source
from app.gui.runstate import RunState, format_eta
from app.gui.search import search_specs

RECIPE = {"format_version": 1, "nodes": {"1": {"type": "TestConst", "version": 1, "params": {"value": 5}}},
          "links": []}


def write_safetensors(path, metadata):
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0\0\0\0")


def write_png_with_text(path, key, text, compressed=False):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    if compressed:
        txt = chunk(b"zTXt", key.encode() + b"\0\0" + zlib.compress(text.encode("latin-1")))
    else:
        txt = chunk(b"tEXt", key.encode() + b"\0" + text.encode("latin-1"))
    idat = chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + txt + idat + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["safetensors", "png", "png-z"])
def test_a_recipe_is_recovered_from_an_output_file(gui_registry, tmp_path, kind):
    text = json.dumps(RECIPE)
    if kind == "safetensors":
        path = tmp_path / "lora.safetensors"
        write_safetensors(path, {"nodetrainer_recipe": text, "ss_other": "x"})
    else:
        path = tmp_path / "sample.png"
        write_png_with_text(path, "nodetrainer_recipe", text, compressed=kind == "png-z")
    doc = Document.open(gui_registry, path)
    assert doc.graph.nodes["1"].params == {"value": 5}
    assert doc.path is None  # saving asks where: the output file is never overwritten by a recipe


def test_an_output_without_a_recipe_says_so(tmp_path):
    path = tmp_path / "other.safetensors"
    write_safetensors(path, {"format": "pt"})
    with pytest.raises(RecipeError, match="holds no NodeTrainer recipe"):
        read_recipe_source(path)
    png = tmp_path / "p.png"
    write_png_with_text(png, "parameters", "a1111 stuff")
    with pytest.raises(RecipeError, match="no 'nodetrainer_recipe'"):
        read_recipe_source(png)


def test_search_finds_by_words_and_by_the_dragged_pin(gui_registry):
    assert search_specs(gui_registry, "lora")[0].type == "LoRAInject"
    takes_buckets = {s.type for s in search_specs(gui_registry, "", "BUCKETS", "out")}
    assert {"TrainLoop", "TestUse", "Cache"} <= takes_buckets and "Concept" not in takes_buckets
    gives_model = {s.type for s in search_specs(gui_registry, "", "MODEL", "in")}
    assert "LoadModel" in gives_model and "Optimizer" not in gives_model


def test_run_state_folds_events_into_badges_plots_and_progress():
    rs = RunState()
    rs.begin()
    rs.apply({"event": "run_start", "run_id": "r", "nodes": ["1", "2", "3"]})
    rs.apply({"event": "node_cached", "run_id": "r", "node": "1"})
    rs.apply({"event": "node_start", "run_id": "r", "node": "2"})
    rs.apply({"event": "progress", "run_id": "r", "node": "2", "value": 5, "total": 10})
    for step in range(3):
        rs.apply({"event": "metric", "run_id": "r", "node": "2",
                  "values": {"loss": 1.0 / (step + 1), "lr": 1e-4, "step": step, "eta_s": 75}})
    rs.apply({"event": "preview", "run_id": "r", "node": "2", "kind": "images", "images": [b"x"], "captions": ["c"]})
    assert rs.nodes["1"].badge() == "cached" and rs.nodes["2"].badge() == "running 50%"
    assert rs.nodes["3"].status == "queued" and rs.overall() == pytest.approx(1.5 / 3)
    assert [p[1] for p in rs.nodes["2"].metrics["loss"]] == [1.0, 0.5, 1.0 / 3]
    assert rs.nodes["2"].image_history[0]["step"] == 2
    rs.apply({"event": "node_error", "run_id": "r", "node": "2", "message": "boom"})
    rs.apply({"event": "run_done", "run_id": "r", "status": "error", "message": "node 2: boom"})
    assert rs.nodes["2"].status == "error" and rs.nodes["3"].status == "" and not rs.running
    assert "boom" in rs.message and format_eta(75) == "1:15" and format_eta(3725) == "1:02:05"


def test_metric_history_is_thinned_not_unbounded():
    rs = RunState()
    rs.apply({"event": "run_start", "run_id": "r", "nodes": ["1"]})
    for step in range(12000):
        rs.apply({"event": "metric", "run_id": "r", "node": "1", "values": {"loss": 1.0, "step": step}})
    series = rs.nodes["1"].metrics["loss"]
    assert len(series) <= 5001 and series[0][0] == 0 and series[-1][0] == 11999


def test_recent_files_and_crash_autosaves(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    settings.add_recent(a)
    settings.add_recent(b)
    settings.add_recent(a)
    assert settings.recent_files() == [str(a.resolve()), str(b.resolve())]
    settings.write_autosave("{}", a)
    assert settings.orphaned_autosaves() == []  # ours, and we are alive
    dead = settings.autosave_path(pid=2**22 + 12345)
    dead.write_text(json.dumps({"pid": 2**22 + 12345, "saved_at": 1.0, "path": str(a), "recipe": "{}"}))
    found = settings.orphaned_autosaves()
    assert [f["path"] for f in found] == [str(a)]
    settings.discard_autosave(found[0])
    settings.clear_autosave()
    assert not os.listdir(dead.parent)
