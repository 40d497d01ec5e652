"""Every shipped preset validates (needing only the user's model and dataset paths) and runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.graph.recipe import load_recipe
from app.graph.registry import load_registry
from app.graph.validate import validate

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "presets" / "demo_data" / "shapes"
USER_PRESETS = ["sd15_lora", "sdxl_lora", "sd15_finetune"]
TINY = {"sd15_lora": "builtin:tiny-sd", "sdxl_lora": "builtin:tiny-sdxl", "sd15_finetune": "builtin:tiny-sd"}


def cli(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("name", USER_PRESETS)
def test_preset_needs_only_the_model_and_dataset_paths(name):
    reg = load_registry(include_user=False)
    graph, problems = load_recipe(ROOT / "presets" / f"{name}.json", reg)
    problems += validate(graph, reg)
    assert sorted(str(p) for p in problems) == [
        "node 1 (LoadModel): choose a file or folder for 'source' (a diffusers folder, a .safetensors checkpoint, "
        "or builtin:shapes-sd / builtin:tiny-sd / builtin:tiny-sdxl / builtin:tiny-flux)",
        "node 2 (Concept): choose a folder for 'folder' (the folder of images (png, jpg, webp, bmp); subfolders are "
        "included)",
    ]
    assert "come from" in graph.meta["description"]


@pytest.mark.parametrize("name", USER_PRESETS)
def test_preset_runs_on_the_tiny_model(name, tmp_path):
    path = ROOT / "presets" / f"{name}.json"
    sets = [f"LoadModel.source={TINY[name]}", f"Concept.folder={DEMO}", "Bucketer.resolution=64",
            "TrainLoop.max_steps=2", "TrainLoop.sample_steps=2"]
    data = json.loads(path.read_text())
    if any(n.get("title") == "Sample after" for n in data["nodes"].values()):
        sets += ["Sample after.width=64", "Sample after.height=64", "Sample after.steps=2"]
    args = ["run", path, "--workspace", tmp_path, "--events", tmp_path / "events.jsonl"]
    for s in sets:
        args += ["--set", s]
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["status"] == "done"
    saved = [p for p in tmp_path.glob("*.safetensors")]
    assert len(saved) == 1 and saved[0].stat().st_size > 0
    assert any(e["event"] == "metric" and "loss" in e["values"] for e in events)


def test_tiny_demo_is_the_readme_command(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "python launch.py run presets/tiny_demo.json" in readme
    out = cli("run", ROOT / "presets" / "tiny_demo.json", "--workspace", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Outputs are in {tmp_path}" in out.stderr
    assert (tmp_path / "tiny_demo_lora.safetensors").exists()
    before = sorted((tmp_path / "Sample_2").glob("*.png"))
    after = sorted((tmp_path / "Sample_8").glob("*.png"))
    assert len(before) == 4 and len(after) == 4  # red cross, blue cross, yellow cross, red circle
    assert before[0].read_bytes() != after[0].read_bytes()  # training changed what the model makes
    # what the README's before/after picture shows: blobs for the unknown word "cross" before, crosses after
    fill_before = [corner_fill(p) for p in before[:2]]
    fill_after = [corner_fill(p) for p in after[:2]]
    assert min(fill_before) > 0.3 and max(fill_after) < min(fill_before) - 0.1, (fill_before, fill_after)


def corner_fill(png: Path) -> float:
    """How much of the four corner ninths of the drawn shape's bounding box is drawn (a cross: none)."""
    from PIL import Image

    px = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    ink = np.abs(px - np.median(px.reshape(-1, 3), axis=0)).sum(-1) > 120
    ys, xs = np.nonzero(ink)
    m = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    a, b = max(1, m.shape[0] // 3), max(1, m.shape[1] // 3)
    return float(np.mean([m[:a, :b].mean(), m[:a, -b:].mean(), m[-a:, :b].mean(), m[-a:, -b:].mean()]))
