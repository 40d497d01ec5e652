"""The demo recipe made tiny and self-contained for the queue, sweep and compare tests: the smallest
built-in model, a generated dataset of shapes, one training step, one-step samples."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "presets" / "tiny_demo.json"


def tiny_recipe(tmp_path: Path, *, trainloop: dict | None = None, name: str = "demo") -> Path:
    from app.ml.data.demo import make_shapes_dataset

    data = json.loads(DEMO.read_text(encoding="utf-8"))
    folder = tmp_path / "data" / "shapes"
    if not folder.exists():
        make_shapes_dataset(folder, n_per_class=2, size=64, seed=0)
    for node in data["nodes"].values():
        p = node["params"]
        if node["type"] == "LoadModel":
            p["source"] = "builtin:tiny-sd"
        elif node["type"] == "Concept":
            p["folder"] = "data/shapes"
        elif node["type"] == "Sample":
            p.update(steps=1, prompt="red circle\nblue square", width=64, height=64)
        elif node["type"] == "TrainLoop":
            p.update({"max_steps": 1, "sample_prompts": "", **(trainloop or {})})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def events(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out
