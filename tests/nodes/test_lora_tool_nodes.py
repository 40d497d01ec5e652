"""LoRA tool nodes through the real executor, and the shipped graphs/lora_*.json examples (tiny models)."""

import json
from pathlib import Path

import pytest
import torch

from app.engine.executor import Executor
from app.graph.model import Graph
from app.graph.recipe import load_recipe
from app.graph.registry import load_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reg():
    return load_registry(include_user=False)


def random_lora(bundle, algorithm="locon", rank=4, alpha=2.0, seed=0, te="attn-only"):
    from app.ml.adapters import AdapterConfig, create_adapter_set

    cfg = AdapterConfig(algorithm=algorithm, rank=rank, alpha=alpha, seed=seed,
                        targets={"unet": "full", "text_encoder": te, "text_encoder_2": te})
    aset = create_adapter_set(bundle, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return aset


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two kohya LoRA files for tiny-sd and one for tiny-sdxl, with kohya training metadata."""
    from app.ml.models import load_model
    from app.ml.save import save_adapter

    d = tmp_path_factory.mktemp("loras")
    sd, sdxl = load_model("builtin:tiny-sd"), load_model("builtin:tiny-sdxl")
    extra = {"modelspec.trigger_phrase": "shapes", "ss_tag_frequency": '{"shapes": {"cross": 3}}'}
    return {
        "a": save_adapter(random_lora(sd, seed=1), d / "a.safetensors", dtype="fp32", extra_metadata=extra),
        "b": save_adapter(random_lora(sd, rank=2, seed=2), d / "b.safetensors", dtype="fp32"),
        "xl": save_adapter(random_lora(sdxl, seed=3), d / "xl.safetensors", dtype="fp32"),
    }


def run(reg, g, tmp_path, ok=True):
    events = []
    result = Executor(reg).run(g, emit=events.append, workspace=tmp_path / "ws")
    errors = [e["message"] for e in events if e["event"] in ("node_error", "run_done") and e.get("message")]
    if ok:
        assert result.status == "done", errors
    return result, events, errors


def example(reg, name, params):
    g, problems = load_recipe(ROOT / "graphs" / f"{name}.json", reg)
    assert not problems, problems
    for (nid, key), value in params.items():
        if nid in ("save", "merge") and isinstance(value, Path):
            value = value.name  # outputs: relative, into the workspace
        g.set_param(nid, key, str(value) if isinstance(value, Path) else value)
    return g


def logs(events):
    return "\n".join(e["message"] for e in events if e["event"] == "log")


def test_load_lora_shows_its_metadata_and_refuses_another_base_model(reg, files, tmp_path):
    g = example(reg, "lora_convert", {("lora", "path"): files["xl"], ("save", "path"): tmp_path / "ws" / "x.safetensors"})
    _, _, errors = run(reg, g, tmp_path, ok=False)
    assert any("this is an SDXL LoRA; the model is SD 1.5" in e for e in errors), errors
    assert not (tmp_path / "ws" / "x.safetensors").exists()
    g = example(reg, "lora_convert", {("lora", "path"): files["a"], ("save", "path"): tmp_path / "ws" / "c.safetensors"})
    _, events, _ = run(reg, g, tmp_path)
    text = logs(events)
    assert "locon rank 4 alpha 2.0 for SD 1.5 (kohya layout" in text and "trigger words: shapes" in text


def test_convert_keeps_the_metadata_and_every_value(reg, files, tmp_path):
    from safetensors import safe_open

    from app.ml.adapters import load_adapter_file
    from app.ml.lora_tools import effective_deltas
    from app.ml.models import load_model

    for layout in ("comfyui", "kohya"):
        out = tmp_path / "ws" / f"conv_{layout}.safetensors"
        g = example(reg, "lora_convert", {("lora", "path"): files["a"], ("save", "path"): out, ("save", "layout"): layout})
        run(reg, g, tmp_path)
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
        assert meta["modelspec.trigger_phrase"] == "shapes" and "cross" in meta["ss_tag_frequency"]
        assert meta["ss_output_name"] == f"conv_{layout}" and meta["nodetrainer_recipe"]
        assert any(k.startswith("diffusion_model.") for k in keys) == (layout == "comfyui")
        sd = load_model("builtin:tiny-sd")
        a, b = (effective_deltas(sd, load_adapter_file(p, sd)) for p in (files["a"], out))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


@pytest.mark.parametrize("tool", ["resize", "merge"])
def test_peft_output_loads_in_diffusers_with_no_unused_keys(reg, files, tmp_path, tool):
    """LoCon files (3x3 convs) resized or merged, then written for diffusers' load_lora_weights."""
    import logging

    from app.ml.models import load_model

    out = tmp_path / "ws" / "peft.safetensors"
    if tool == "resize":
        g = example(reg, "lora_resize", {("lora", "path"): files["b"], ("save", "path"): out, ("resize", "method"): "fixed",
                                         ("resize", "rank"): 2, ("save", "layout"): "peft", ("save", "dtype"): "fp32"})
    else:
        g = example(reg, "lora_merge_loras", {("a", "path"): files["a"], ("b", "path"): files["b"], ("save", "path"): out,
                                              ("save", "layout"): "peft", ("save", "dtype"): "fp32"})
    run(reg, g, tmp_path)
    diffusers = pytest.importorskip("diffusers")
    bundle = load_model("builtin:tiny-sd")
    pipe = diffusers.StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                             tokenizer=bundle.tokenizers[0], unet=bundle.unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    logging.getLogger("peft").addHandler(handler)
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(out))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        logging.getLogger("peft").removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        in_file = {k.rsplit(".lora_A", 1)[0].removeprefix("unet.") for k in f.keys() if k.startswith("unet.") and ".lora_A" in k}
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.unet.named_parameters() if ".lora_A." in n}
    assert in_file and loaded == in_file  # every UNet layer of the file, convs included, is in the pipeline
    assert not [m for m in messages if "unexpected" in m.lower() or "not used" in m.lower() or "unused" in m.lower()], messages


def test_apply_lora_stacks_with_separate_strengths_and_never_changes_the_base(reg, files, tmp_path):
    g = Graph()
    for nid, t, params in [("m", "LoadModel", {"source": "builtin:tiny-sd"}), ("a", "LoadLoRA", {"path": str(files["a"])}),
                           ("b", "LoadLoRA", {"path": str(files["b"])}),
                           ("x", "ApplyLoRA", {"strength": 0.5, "text_encoder_strength": 0.0}),
                           ("y", "ApplyLoRA", {"strength": 1.0, "text_encoder_strength": 1.0})]:
        g.add_node(t, reg.get(t).version, params, node_id=nid)
    for link in [("m", "model", "a", "model"), ("m", "model", "b", "model"), ("m", "model", "x", "model"),
                 ("a", "lora", "x", "lora"), ("x", "model", "y", "model"), ("b", "lora", "y", "lora")]:
        g.add_link(*link)
    result, _, _ = run(reg, g, tmp_path)
    handle = result.outputs["y"]["model"]
    pairs = handle.adapter_pairs()
    assert [s for _, s in pairs] == [0.5, 0.0, 1.0]
    assert [a.components for a, _ in pairs] == [["unet"], ["text_encoder"], ["unet", "text_encoder"]]
    # TrainLoop trains the newest adapter: it continues b, and the LoadLoRA output stays frozen as read.
    assert pairs[-1][0].num_parameters() > 0
    assert pairs[0][0].num_parameters() == pairs[1][0].num_parameters() == 0  # a's parts share LoadLoRA's modules
    base = handle.base
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = base.text_encoders[0](ids)[0]
        before = {k: v.clone() for k, v in base.unet.state_dict().items()}
        with handle.patched():
            te = base.text_encoders[0](ids)[0]
        only_a = pairs[:2]
        from app.ml.adapters import attached

        with attached(base, only_a):
            te_a = base.text_encoders[0](ids)[0]
    assert torch.equal(te_a, plain)  # strength 0 on a's text-encoder part
    assert not torch.allclose(te, plain)  # b's text-encoder part at 1.0
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_merge_then_sample_equals_apply_then_sample(name, tmp_path):
    from app.ml.adapters import load_adapter_file
    from app.ml.models import load_model
    from app.ml.sampling import sample_images
    from app.ml.save import save_adapter, save_diffusers

    bundle = load_model("builtin:" + name)
    lora_path = save_adapter(random_lora(bundle, seed=5), tmp_path / "l.safetensors", dtype="fp32")
    aset = load_adapter_file(lora_path, bundle, trainable=False)
    merged = load_model(str(save_diffusers(bundle, tmp_path / "merged", adapters=[(aset, 0.8)], dtype="fp32")))
    kw = dict(width=64, height=64, steps=4, cfg=5.0, seed=3, sampler="euler")
    runtime = sample_images(bundle, ["a cross"], adapters=[(aset, 0.8)], **kw).latents[0]
    baked = sample_images(merged, ["a cross"], **kw).latents[0]
    plain = sample_images(bundle, ["a cross"], **kw).latents[0]
    assert float((runtime - plain).abs().max()) > 1e-2  # the LoRA changes the image
    err = float((runtime - baked).norm() / runtime.norm())
    print(f"{name}: merge-then-sample vs apply-then-sample: relative error {err:.2e}, "
          f"max |diff| {float((runtime - baked).abs().max()):.2e} of max |latent| {float(runtime.abs().max()):.2f}")
    assert err < 1e-5, err


def test_every_lora_example_graph_runs(reg, files, tmp_path):
    from safetensors import safe_open

    from app.ml.adapters import load_adapter_file
    from app.ml.lora_tools import effective_deltas
    from app.ml.models import load_model

    ws = tmp_path / "ws"
    merged = tmp_path / "ws" / "merged"
    _, events, _ = run(reg, example(reg, "lora_apply_sample", {("lora", "path"): files["a"]}), tmp_path)
    assert "image(s) in" in logs(events)
    run(reg, example(reg, "lora_merge_to_model", {("lora", "path"): files["a"], ("merge", "path"): merged,
                                                    ("merge", "format"): "diffusers_folder",
                                                    ("merge", "dtype"): "fp32"}), tmp_path)
    assert (merged / "model_index.json").is_file()
    out = tmp_path / "ws" / "extracted.safetensors"
    _, events, _ = run(reg, example(reg, "lora_extract", {("tuned", "source"): merged, ("save", "path"): out,
                                                             ("extract", "rank"): 4, ("extract", "conv_rank"): 4,
                                                             ("save", "dtype"): "fp32"}),
                       tmp_path)
    assert "Frobenius share kept" in logs(events)
    sd = load_model("builtin:tiny-sd")
    want = effective_deltas(sd, load_adapter_file(files["a"], sd))
    got = effective_deltas(sd, load_adapter_file(out, sd))
    worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
    print(f"extract of a rank-4 LoRA baked at fp32: worst relative error {worst:.2e}")
    assert worst < 1e-4
    out = tmp_path / "ws" / "m2.safetensors"
    run(reg, example(reg, "lora_merge_loras", {("a", "path"): files["a"], ("b", "path"): files["b"],
                                                 ("save", "path"): out}), tmp_path)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "6"  # 4 + 2, side by side
    out = tmp_path / "ws" / "r.safetensors"
    _, events, _ = run(reg, example(reg, "lora_resize", {("lora", "path"): files["a"], ("save", "path"): out}), tmp_path)
    assert out.is_file() and "Frobenius share kept" in logs(events)
    assert not list(ws.glob("**/*.tmp*"))


def test_grid_example_draws_one_labelled_png_per_run(reg, files, tmp_path):
    """Rows = LoRA files from a folder, columns = strengths; at strength 0 every row is the base image."""
    import shutil

    from PIL import Image

    from app.ml.sampling.png import read_png_text

    folder = tmp_path / "saves"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(files[name], folder / f"step_{name}.safetensors")
    g = example(reg, "lora_grid", {("grid", "loras"): str(folder), ("grid", "strengths"): "0, 1",
                                   ("grid", "steps"): 2})
    result, events, _ = run(reg, g, tmp_path)
    out = Path(result.outputs["grid"]["images"]["paths"][0])
    assert out.parent == tmp_path / "ws" and out.name == "grid.png"
    text = read_png_text(out)
    assert json.loads(text["nodetrainer_recipe"])["nodes"]["grid"]["type"] == "Grid"
    assert "Steps: 2" in text["parameters"]
    assert any(e["event"] == "preview" and e["kind"] == "images" for e in events)
    im = Image.open(out).convert("RGB")
    top = im.height - 2 * 64

    def cell(r, c):
        return im.crop((96 + c * 64, top + r * 64, 96 + (c + 1) * 64, top + (r + 1) * 64))

    assert im.width == 96 + 2 * 64 and top > 0  # a label row above the cells
    assert list(cell(0, 0).getdata()) == list(cell(1, 0).getdata())  # strength 0: the same base image
    assert list(cell(0, 1).getdata()) != list(cell(1, 1).getdata())  # strength 1: the LoRAs differ
    g.set_param("grid", "loras", str(tmp_path / "missing"))
    _, _, errors = run(reg, g, tmp_path, ok=False)
    assert any("no such LoRA file or folder" in e for e in errors), errors


def test_periodic_saves_have_aliases_that_do_not_collide(reg, tmp_path):
    """A1111 aliases a LoRA by ss_output_name: the periodic saves of two runs must not share one."""
    from safetensors import safe_open
    from test_training_nodes import DEMO, lora_recipe

    from app.graph.recipe import loads_recipe

    train = {"epochs": 1, "save_every": 2, "save_unit": "steps", "max_steps": 5}
    graph, problems = loads_recipe(json.dumps(lora_recipe(DEMO, train, batch=4, res="32", save=None)), registry=reg)
    assert not problems
    names = []
    for run_name in ("run_a", "run_b"):
        events = []
        result = Executor(reg).run(graph, emit=events.append, workspace=tmp_path / run_name)
        assert result.status == "done", [e.get("message") for e in events if e["event"] == "node_error"]
        for f in sorted((tmp_path / run_name / "TrainLoop_6" / "saves").glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                names.append(fh.metadata()["ss_output_name"])
    assert names[0] == "run_a_TrainLoop_6_step_0000002"
    assert len(names) == 4 and len(set(names)) == 4  # steps 2 and 4 of each run


def test_a_flux_lora_loads_and_applies_on_flux_and_is_refused_by_name_on_sd(reg, tmp_path):
    from app.ml.models import load_model
    from app.ml.save import save_adapter

    flux = load_model("builtin:tiny-flux")
    path = save_adapter(random_lora(flux, algorithm="lora", te="none"), tmp_path / "flux.safetensors", dtype="fp32")
    g = example(reg, "lora_convert", {("lora", "path"): path, ("save", "path"): tmp_path / "ws" / "f.safetensors"})
    _, _, errors = run(reg, g, tmp_path, ok=False)  # the example's model is SD 1.5
    assert any("this is a Flux LoRA; the model is SD 1.5" in e for e in errors), errors
    g.set_param("model", "source", "builtin:tiny-flux")
    _, events, _ = run(reg, g, tmp_path)
    assert "for Flux" in logs(events), logs(events)
