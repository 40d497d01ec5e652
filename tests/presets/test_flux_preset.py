"""presets/flux_lora.json: validates needing only the user's model and dataset paths, cites its guides, and runs
(cached T5 + CLIP text, FlowObjective, LoRA, samples, kohya save) on the built-in tiny Flux model."""

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
PRESET = ROOT / "presets" / "flux_lora.json"
DEMO = ROOT / "presets" / "demo_data" / "shapes"


def test_flux_preset_needs_only_the_model_and_dataset_paths():
    reg = load_registry(include_user=False)
    graph, problems = load_recipe(PRESET, reg)
    problems += validate(graph, reg)
    assert sorted(p.node_id for p in problems) == ["1", "2"], [str(p) for p in problems]
    description = graph.meta["description"]
    for fact in ("rank 16", "guidance 1.0", "3.1582", "512, 768 and 1024", "cached", "bf16", "kohya", "ai-toolkit",
                 "SimpleTuner"):
        assert fact in description, fact
    objective = graph.nodes[graph.links_into("8", "objective")[0].from_node]
    assert objective.type == "FlowObjective" and objective.params["guidance"] == 1.0


def test_flux_preset_runs_on_the_tiny_flux_model(tmp_path):
    sets = ["LoadModel.source=builtin:tiny-flux", "LoadModel.text_max_length=32", f"Concept.folder={DEMO}",
            "Bucketer.resolution=64", "TrainLoop.max_steps=2", "TrainLoop.sample_steps=2",
            "Sample after.width=64", "Sample after.height=64", "Sample after.steps=2"]
    args = ["run", PRESET, "--workspace", tmp_path, "--events", tmp_path / "events.jsonl"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    losses = [e["values"]["loss"] for e in events if e["event"] == "metric" and "loss" in e["values"]]
    assert len(losses) == 2 and all(x == x for x in losses)
    (lora,) = tmp_path.rglob("flux_lora*.safetensors")
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "flux1"
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in f.keys())
