"""LoadModel, LoRAInject, Sample and Save through the real executor (tiny model)."""

import hashlib
import json

import pytest

from app.engine.executor import Executor
from app.graph.model import Graph
from app.graph.registry import load_registry


@pytest.fixture(scope="module")
def reg():
    return load_registry(include_user=False)


def checksum(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def graph(reg, *nodes, links=()):
    g = Graph()
    for nid, t, params in nodes:
        g.add_node(t, reg.get(t).version, params, node_id=nid)
    for a in links:
        g.add_link(*a)
    return g


def run(ex, g, tmp_path, **kw):
    events = []
    result = ex.run(g, emit=events.append, workspace=tmp_path / "ws", **kw)
    errors = [e["message"] for e in events if e["event"] == "node_error"]
    assert result.status == "done", errors
    return result, events


def test_rank_change_rebuilds_only_the_adapter_and_never_touches_the_base(reg, tmp_path):
    g = graph(reg, ("1", "LoadModel", {"source": "builtin:tiny-sd"}),
              ("2", "LoRAInject", {"rank": 4, "alpha": 4.0}), links=[("1", "model", "2", "model")])
    ex = Executor(reg)
    r1, _ = run(ex, g, tmp_path)
    handle = r1.outputs["2"]["model"]
    base = handle.base
    before = checksum(base.unet), checksum(base.text_encoders[0])
    assert len(handle.adapters) == 1 and handle.adapters[0].config.rank == 4
    g.set_param("2", "rank", 8)
    r2, ev = run(ex, g, tmp_path)
    assert [e["node"] for e in ev if e["event"] == "node_cached"] == ["1"]
    h2 = r2.outputs["2"]["model"]
    assert h2.base is base and len(h2.adapters) == 1 and h2.adapters[0].config.rank == 8
    assert (checksum(base.unet), checksum(base.text_encoders[0])) == before
    logs = [e["message"] for e in ev if e["event"] == "log"]
    assert any("trainable parameters" in m for m in logs)


def test_sample_and_save_write_files_with_the_recipe(reg, tmp_path):
    g = graph(reg, ("1", "LoadModel", {"source": "builtin:tiny-sd"}),
              ("2", "LoRAInject", {"rank": 4, "alpha": 4.0}),
              ("3", "Sample", {"prompt": "red circle\nblue square", "width": 64, "height": 64, "steps": 4,
                               "seed": 5, "sampler": "euler"}),
              ("4", "Save", {"path": "out/lora.safetensors", "layout": "kohya", "dtype": "fp16"}),
              links=[("1", "model", "2", "model"), ("2", "model", "3", "model"), ("2", "model", "4", "model")])
    result, ev = run(Executor(reg), g, tmp_path)
    paths = result.outputs["3"]["images"]["paths"]
    assert len(paths) == 2
    from PIL import Image

    with Image.open(paths[0]) as im:
        recipe = json.loads(im.text["nodetrainer_recipe"])
    assert recipe["nodes"]["3"]["params"]["prompt"] == "red circle\nblue square"
    previews = [e for e in ev if e["event"] == "preview" and e["kind"] == "images"]
    assert previews and len(previews[0]["images"]) == 2 and previews[0]["images"][0][:4] == b"\x89PNG"
    saved = tmp_path / "ws" / "out" / "lora.safetensors"
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["nodetrainer_recipe"])["nodes"]["4"]["type"] == "Save"
    assert meta["ss_network_dim"] == "4" and any(k.startswith("lora_unet_") for k in keys)
    # a second run keeps the first file: never overwrite unless asked
    run(Executor(reg), g, tmp_path)
    assert (tmp_path / "ws" / "out" / "lora_1.safetensors").exists()


def test_bad_model_path_names_the_node_and_file(reg, tmp_path):
    g = graph(reg, ("1", "LoadModel", {"source": str(tmp_path / "nope.safetensors")}))
    events = []
    result = Executor(reg).run(g, emit=events.append)
    assert result.status == "error"
    err = [e for e in events if e["event"] == "node_error"][0]
    assert err["node"] == "1" and "nope.safetensors" in err["message"]


def test_save_adapter_without_adapter_is_a_clear_error(reg, tmp_path):
    g = graph(reg, ("1", "LoadModel", {"source": "builtin:tiny-sd"}), ("2", "Save", {"path": "x.safetensors"}),
              links=[("1", "model", "2", "model")])
    events = []
    result = Executor(reg).run(g, emit=events.append, workspace=tmp_path)
    assert result.status == "error" and "no adapter to save" in result.error
