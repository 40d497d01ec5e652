"""Importing OneTrainer and kohya configs: every test config (SD 1.5 and SDXL, LoRA and fine-tune,
sd-scripts TOML with and without a dataset TOML, the kohya_ss GUI's JSON) converts to a valid recipe in
which each setting is mapped or listed as not imported, and the recipe trains a step on the tiny models
once its paths point at tiny ones."""

import json
import tomllib
from pathlib import Path

import pytest

from app.cli import main
from app.importers import ImportError_, import_config

FIX = Path(__file__).resolve().parent / "fixtures" / "import"
CASES = {  # name: (tool, config, dataset, tiny model, adapter?)
    "ot_sd15_lora": ("onetrainer", "onetrainer_sd15_lora.json", None, "builtin:tiny-sd", True),
    "ot_sdxl_lora": ("onetrainer", "onetrainer_sdxl/sdxl_lora.json", None, "builtin:tiny-sdxl", True),
    "ot_sd15_finetune": ("onetrainer", "onetrainer_sd15_finetune.json", None, "builtin:tiny-sd", False),
    "ot_sdxl_finetune": ("onetrainer", "onetrainer_sdxl_finetune.json", None, "builtin:tiny-sdxl", False),
    "kohya_sd15_lora": ("kohya", "kohya_sd15_lora.toml", None, "builtin:tiny-sd", True),
    "kohya_sdxl_lycoris": ("kohya", "kohya_sdxl_lycoris.toml", "kohya_sdxl_dataset.toml", "builtin:tiny-sdxl", True),
    "kohya_sd15_finetune": ("kohya", "kohya_sd15_finetune.toml", "kohya_sd15_dataset.toml", "builtin:tiny-sd", False),
    "kohya_sdxl_finetune": ("kohya", "kohya_sdxl_finetune.toml", None, "builtin:tiny-sdxl", False),
    "kohya_ss_gui": ("kohya", "kohya_ss_sdxl_lora_gui.json", None, "builtin:tiny-sdxl", True),
    "ot_flux_lora": ("onetrainer", "onetrainer_flux_lora.json", None, "builtin:tiny-flux", True),
    "kohya_flux_lora": ("kohya", "kohya_flux_lora.toml", None, "builtin:tiny-flux", True),
}


def _import(tmp_path, name, capsys=None):
    tool, config, dataset, *_ = CASES[name]
    out = tmp_path / f"{name}.json"
    argv = ["import", tool, str(FIX / config), "-o", str(out)] + (["--dataset", str(FIX / dataset)] if dataset else [])
    assert main(argv) == 0
    return out, json.loads(out.read_text())


def _has(params, expected):
    return {k: params.get(k) for k in expected} == expected


def _objective(recipe) -> dict:
    """The noise and loss params: a NoiseObjective node's where the catalogue has one, else TrainLoop's."""
    nodes = _nodes(recipe, "NoiseObjective") or _nodes(recipe, "TrainLoop")
    return nodes[0]["params"]


def _nodes(recipe, type_):
    return [n for n in recipe["nodes"].values() if n["type"] == type_]


@pytest.mark.parametrize("name", list(CASES))
def test_every_setting_is_mapped_or_listed(tmp_path, name):
    from app.graph.recipe import load_recipe
    from app.graph.registry import load_registry

    tool, config, dataset, _, adapter = CASES[name]
    out, recipe = _import(tmp_path, name)
    graph, problems = load_recipe(out, load_registry())
    assert not problems
    meta = recipe["meta"]["imported"]
    assert bool(_nodes(recipe, "LoRAInject")) == adapter
    result = import_config(tool, FIX / config, dataset=FIX / dataset if dataset else None)
    accounted = " ".join(result.mapped) + " " + " ".join(result.not_imported)
    assert meta["not_imported"] == result.not_imported
    assert not [n for n in result.not_imported if "has no param" in n]  # every target param exists
    source = FIX / config
    keys = (tomllib.loads(source.read_text()) if source.suffix == ".toml" else json.loads(source.read_text()))
    flat = {}
    for k, v in keys.items():
        flat.update(v if isinstance(v, dict) and source.suffix == ".toml" else {k: v})
    for key in flat:
        if key in ("concepts", "samples"):
            continue
        assert key in accounted, f"{key} is neither mapped nor listed"


def test_mappings_of_the_sd15_lora_configs(tmp_path):
    _, ot = _import(tmp_path, "ot_sd15_lora")
    inject, = _nodes(ot, "LoRAInject")
    assert _has(inject["params"], {"rank": 16, "alpha": 1.0, "unet_layers": "attn-mlp",
                                   "text_encoder_layers": "attn-mlp"})
    opt, = _nodes(ot, "Optimizer")
    assert _has(opt["params"], {"schedule": "cosine", "lr": 0.0003, "text_encoder_lr": 0.0001})
    assert (opt["params"]["stop_text_encoder_after"], opt["params"]["stop_text_encoder_unit"]) == (30, "epochs")
    concepts = _nodes(ot, "Concept")
    assert [c["params"].get("concept_type", "standard") for c in concepts] == ["standard", "validation"]
    assert concepts[0]["params"]["repeats"] == 2.0 and concepts[0]["params"]["tag_dropout"] == 0.1
    aug, = _nodes(ot, "Augment")  # only the first concept augments
    assert _has(aug["params"], {"flip": "random", "crop_jitter": True, "brightness": 0.1})
    train, = _nodes(ot, "TrainLoop")
    assert _has(_objective(ot), {"weighting": "min_snr", "min_snr_gamma": 5.0, "offset_noise": 0.05})
    assert _has(train["params"], {"sample_every": 10, "sample_unit": "epochs", "sample_sampler": "dpmpp_2m",
                                  "sample_prompts": "a landscape in my style\na portrait in my style"})
    assert _nodes(ot, "Cache")
    _, k = _import(tmp_path, "kohya_sd15_lora")
    inject, = _nodes(k, "LoRAInject")
    assert _has(inject["params"], {"algorithm": "locon", "rank": 32, "alpha": 16.0, "conv_rank": 8, "conv_alpha": 4.0})
    train, = _nodes(k, "TrainLoop")
    assert _has(train["params"], {"epochs": 10, "max_tokens": "225", "sample_steps": 28, "sample_cfg": 7.5,
                                  "sample_seed": 1,
                                    "sample_prompts": "mychar standing in a field\nmychar sitting on a chair, smiling",
                                    "backup_every": 2})
    assert [c["params"].get("concept_type", "standard") for c in _nodes(k, "Concept")] == ["standard", "prior"]
    notes = k["meta"]["imported"]["not_imported"]
    assert any(n.startswith("clip_skip = 2 (") for n in notes)


def test_lycoris_and_dataset_toml(tmp_path, capsys):
    _, r = _import(tmp_path, "kohya_sdxl_lycoris")
    out = capsys.readouterr().out
    assert "not imported: network_args.use_tucker = False (" in out  # printed as well as stored
    inject, = _nodes(r, "LoRAInject")
    assert _has(inject["params"], {"algorithm": "lokr", "lokr_factor": 8, "unet_layers": "attn-mlp",
                                     "text_encoder_layers": "none", "rank_dropout": 0.05})
    concepts = _nodes(r, "Concept")
    assert [c["params"].get("repeats") for c in concepts] == [10.0, 2.0, 1.0, 3.0]
    assert concepts[2]["params"]["concept_type"] == "prior" and concepts[2]["params"]["name"] == "landscape"
    assert "768" in [a["params"].get("resolution") for a in _nodes(r, "Augment")]  # the second dataset's resolution
    opt, = _nodes(r, "Optimizer")
    assert _has(opt["params"], {"optimizer": "prodigy", "lr": 1.0, "d_coef": 2.0})
    assert _has(_objective(r), {"loss": "huber", "huber_delta": 0.1, "weighting": "debiased", "max_noising": 0.9})


def test_unsupported_configs_are_refused_by_name(tmp_path):
    bad = tmp_path / "vae.json"
    bad.write_text(json.dumps({"training_method": "FINE_TUNE_VAE", "model_type": "STABLE_DIFFUSION_15"}))
    with pytest.raises(ImportError_, match="FINE_TUNE_VAE is not supported"):
        import_config("onetrainer", bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("network_dim = ")
    assert main(["import", "kohya", str(broken), "-o", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_imported_recipe_trains_a_step_on_the_tiny_model(tmp_path, name):
    from app.ml.data.demo import make_shapes_dataset

    out, recipe = _import(tmp_path, name)
    data = tmp_path / "data"
    make_shapes_dataset(data, n_per_class=1, size=64, seed=0)
    tiny = CASES[name][3]
    for nid, node in recipe["nodes"].items():  # the paths swapped for tiny ones, one step
        p = node["params"]
        if node["type"] == "LoadModel":
            p.update(source=tiny, vae="", ae="", clip_l="", t5xxl="")
        elif node["type"] == "Concept":
            source = p.get("prompt_source", "per_image")
            p.update(folder=str(data), caption_file="", name=f"concept {nid}",
                     prompt_source="per_image" if source == "concept_file" else source)
        elif node["type"] == "Augment":
            p.update(resolution="64" if p.get("resolution") else "", preview_images=0)
        elif node["type"] == "Bucketer":
            p.update(resolution="64", batch_size=1, quantization=16 if "flux" in tiny else 8)
        elif node["type"] == "TrainLoop":
            p.update(max_steps=1, sample_prompts="", train_dtype="fp32", save_every=0, backup_every=0)
        elif node["type"] == "Optimizer" and p.get("optimizer", "").endswith("8bit"):
            p["optimizer"] = p["optimizer"][:-4]  # 8-bit optimizers need a CUDA GPU
    out.write_text(json.dumps(recipe))
    assert main(["run", str(out), "--workspace", str(tmp_path / "ws")]) == 0
    saved = list((tmp_path / "ws").glob("*.safetensors")) + [p for p in (tmp_path / "ws").iterdir() if p.is_dir()
                                                           and (p / "model_index.json").exists()]
    assert saved, sorted(p.name for p in (tmp_path / "ws").iterdir())


def test_flux_configs_become_flux_recipes(tmp_path):
    for name in ("ot_flux_lora", "kohya_flux_lora"):
        _, r = _import(tmp_path, name)
        load, = _nodes(r, "LoadModel")
        assert load["params"]["family"] == "flux-dev"
        flow = _nodes(r, "FlowObjective")
        if flow:  # where the catalogue has the flow objective as a node
            assert _has(flow[0]["params"], {"shift": "fixed"})
            assert flow[0]["params"]["shift_value"] in (3.0, 3.1582)
    _, k = _import(tmp_path, "kohya_flux_lora")
    assert _has(_nodes(k, "LoadModel")[0]["params"], {"ae": "/models/ae.safetensors",
                                                     "clip_l": "/models/clip_l.safetensors",
                                                     "t5xxl": "/models/t5xxl_fp16.safetensors"})
