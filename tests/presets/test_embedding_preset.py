"""The embedding demo preset validates as shipped (no path to set) and runs: the embedding file it saves
is A1111's SD 1.5 layout, named after the token, with its recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from app.graph.recipe import load_recipe
from app.graph.registry import load_registry
from app.graph.validate import validate

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "embedding_sd.json"


def test_embedding_preset_validates_as_shipped():
    reg = load_registry(include_user=False)
    graph, problems = load_recipe(PRESET, reg)
    problems += validate(graph, reg, recipe_dir=PRESET.parent)
    assert problems == []
    types = {n.type for n in graph.nodes.values()}
    assert {"Embedding", "TrainLoop", "Save"} <= types and "LoRAInject" not in types  # the embedding alone trains
    data = json.loads(PRESET.read_text())
    captions = {p.read_text().strip() for p in (PRESET.parent / "demo_data" / "red_shapes").glob("*.txt")}
    assert captions and all("<embedding>" in c for c in captions)
    assert "ohwx" in data["meta"]["description"]


def test_embedding_preset_runs_and_saves_the_embedding(tmp_path):
    sets = ["TrainLoop.epochs=1", "TrainLoop.sample_steps=2", "Sample before.steps=2", "Sample after.steps=2"]
    args = [sys.executable, str(ROOT / "launch.py"), "run", str(PRESET), "--workspace", str(tmp_path)]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "caption as encoded" in out.stderr and "-> 'a <ohwx> " in out.stderr  # <embedding> became the token
    with safe_open(str(tmp_path / "ohwx.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert json.loads(f.metadata()["nodetrainer_recipe"])["nodes"]["5"]["type"] == "Embedding"
