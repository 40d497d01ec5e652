"""A Flux recipe's image sizes that are not multiples of 16 px are validation errors naming the node and the param,
told from LoadModel's params or the model file's header alone (validation never imports torch)."""

import subprocess
import sys
from pathlib import Path

import pytest

from app.graph.model import Graph
from app.graph.registry import load_registry
from app.graph.validate import validate

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def reg():
    return load_registry(include_user=False)


def _graph(reg, model: dict, sample: dict, bucketer: dict | None = None) -> Graph:
    g = Graph()
    g.add_node("LoadModel", reg.get("LoadModel").version, model, node_id="1")
    g.add_node("Sample", reg.get("Sample").version, {"prompt": "a", **sample}, node_id="2")
    g.add_link("1", "model", "2", "model")
    if bucketer is not None:
        g.add_node("Bucketer", reg.get("Bucketer").version, bucketer, node_id="3")
    return g


def _size_problems(reg, g, **kw):
    return [p for p in validate(g, reg, **kw) if "multiples of" in p.message]


def test_flux_sizes_not_multiple_of_16_are_named_by_node_and_param(reg):
    g = _graph(reg, {"source": "builtin:tiny-flux"}, {"width": 520, "height": 512},
               {"resolution": "512,760", "quantization": 8})
    problems = {(p.node_id, p.message.split(" = ")[0]): p.message for p in _size_problems(reg, g)}
    assert set(problems) == {("2", "'width'"), ("3", "'resolution'"), ("3", "'quantization'")}
    assert "Flux.1 dev needs image sides that are multiples of 16 px (520 is not); use 512 or 528" in problems[("2", "'width'")]
    assert "(760 is not)" in problems[("3", "'resolution'")]


def test_the_family_param_or_the_file_header_tells_flux(reg, tmp_path):
    assert _size_problems(reg, _graph(reg, {"source": "builtin:tiny-sd"}, {"width": 520, "height": 512})) == []
    forced = _graph(reg, {"source": "builtin:tiny-sd", "family": "flux-schnell"}, {"width": 512, "height": 1000})
    assert [p.node_id for p in _size_problems(reg, forced)] == ["2"]
    from safetensors.numpy import save_file
    import numpy as np

    f = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros((6, 2), np.float16),
               "guidance_in.in_layer.weight": np.zeros((2, 2), np.float16)}, str(f))
    by_header = _graph(reg, {"source": "flux1-dev.safetensors"}, {"width": 504, "height": 512})
    assert [p.node_id for p in _size_problems(reg, by_header, recipe_dir=tmp_path)] == ["2"]
    ok = _graph(reg, {"source": str(f)}, {"width": 1024, "height": 768}, {"resolution": "1024x768", "quantization": 64})
    assert _size_problems(reg, ok) == []


def test_the_size_check_does_not_import_torch():
    code = (
        "import sys\n"
        "from app.graph.registry import load_registry\n"
        "from app.graph.inputs_check import check_image_sizes\n"
        "from app.graph.model import Graph\n"
        "reg = load_registry(include_user=False)\n"
        "g = Graph()\n"
        "g.add_node('LoadModel', reg.get('LoadModel').version, {'source': 'builtin:tiny-flux'}, node_id='1')\n"
        "g.add_node('Sample', reg.get('Sample').version, {'prompt': 'a', 'width': 520}, node_id='2')\n"
        "print(len(check_image_sizes(g, reg)))\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["1", ""]
