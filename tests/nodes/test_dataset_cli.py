"""One end-to-end case through `launch.py run`: a recipe with relative dataset paths, the event
file, and a bad-input failure that names the file and the node."""
from __future__ import annotations

import json
import subprocess
import sys

from dataset_node_helpers import ROOT, make_mixed_dataset

RECIPE = {
    "format_version": 1,
    "meta": {"title": "dataset nodes"},
    "nodes": {
        "1": {"type": "Concept", "version": 1, "title": "Things", "params": {"folder": "data", "name": "things"}},
        "2": {"type": "Augment", "version": 1, "params": {"rotation": 5.0, "preview_images": 1, "preview_draws": 2}},
        "3": {"type": "Bucketer", "version": 2, "params": {"resolution": "64", "quantization": 8, "batch_size": 2}},
    },
    "links": [
        {"id": 1, "from_node": "1", "from_output": "dataset", "to_node": "2", "to_input": "dataset"},
        {"id": 2, "from_node": "2", "from_output": "dataset", "to_node": "3", "to_input": "datasets"},
    ],
}


def launch(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "run", str(tmp_path / "recipe.json"),
                           "--workspace", str(tmp_path / "ws"), "--events", str(tmp_path / "ev.jsonl"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_launch_run_dataset_recipe(tmp_path):
    make_mixed_dataset(tmp_path / "data")
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    out = launch(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    events = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    kinds = {}
    for e in events:
        if e["event"] == "preview":
            kinds.setdefault(e["node"], set()).add(e["kind"])
    assert kinds == {"1": {"images", "table", "text"}, "2": {"images"}, "3": {"histogram", "table", "text"}}
    assert any("$base64" in json.dumps(e) for e in events if e["event"] == "preview" and e["kind"] == "images")
    leftovers = [e["message"] for e in events if e["event"] == "log" and e["node"] == "3" and "leftover" in e["message"]]
    assert leftovers and all(".png" in m for m in leftovers)  # by name
    console = out.stdout + out.stderr
    assert "broken.png" in console  # the skipped files are on the console too
    assert "concept name 'things'" in console

    out = launch(tmp_path, "--set", "Things.on_bad_image=error")
    assert out.returncode == 1
    console = out.stdout + out.stderr
    assert "ERROR in Things (node 1)" in console and "broken.png" in console
    events = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    err = [e for e in events if e["event"] == "node_error"]
    assert err[0]["node"] == "1" and "broken.png" in err[0]["message"]
    done = [e for e in events if e["event"] == "run_done"][0]
    assert done["status"] == "error" and done["message"].startswith("node 1 (Things):")
