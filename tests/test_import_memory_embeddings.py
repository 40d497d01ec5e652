"""Importing the memory and embedding settings of kohya and OneTrainer: fp8 / quantized base weights
(LoadModel's denoiser_quant, text_encoder_quant), block swap, activation offloading and the fused
backward pass (TrainLoop), kohya's Flux timestep sampling, and OneTrainer's embeddings (Embedding,
LoadEmbedding, the Optimizer's embedding rate and stop). The recipes validate, and one of each tool
trains two steps on the tiny models with these params on."""

import json
import tomllib
from pathlib import Path

import pytest

from app.cli import main
from app.importers import import_config

FIX = Path(__file__).resolve().parent / "fixtures" / "import"
NEW = {  # name: (tool, config)
    "ot_sd15_pivotal": ("onetrainer", "onetrainer_sd15_pivotal.json"),
    "ot_sdxl_embedding": ("onetrainer", "onetrainer_sdxl_embedding.json"),
    "kohya_flux_memory": ("kohya", "kohya_flux_lora_memory.toml"),
    "kohya_sdxl_fused": ("kohya", "kohya_sdxl_finetune_fused.toml"),
}
STALE = ("fp8 is not available", "memory use is managed by NodeTrainer", "quantized weights are not")


def convert(tool, config):
    result = import_config(tool, config)
    return result, result.recipe


def nodes(recipe, type_):
    return [n for n in recipe["nodes"].values() if n["type"] == type_]


def one(recipe, type_):
    found = nodes(recipe, type_)
    assert len(found) == 1, (type_, found)
    return found[0]["params"]


def wire(recipe, to_type="TrainLoop") -> list[str]:
    """The node types on the MODEL wire into the (first) node of ``to_type``, from LoadModel."""
    by_target = {(l["to_node"], l["to_input"]): l["from_node"] for l in recipe["links"]}
    nid = next(k for k, n in recipe["nodes"].items() if n["type"] == to_type)
    chain = []
    while (nid, "model") in by_target:
        nid = by_target[(nid, "model")]
        chain.append(recipe["nodes"][nid]["type"])
    return chain[::-1]


def skipped(result, key) -> str:
    hits = [n for n in result.not_imported if n.startswith(f"{key} = ")]
    assert len(hits) == 1, (key, result.not_imported)
    return hits[0]


def write(tmp_path, name, text) -> Path:
    p = tmp_path / name
    p.write_text(text if isinstance(text, str) else json.dumps(text))
    return p


@pytest.mark.parametrize("name", list(NEW))
def test_every_setting_of_the_new_fixtures_is_mapped_or_listed(name):
    tool, config = NEW[name]
    result, recipe = convert(tool, FIX / config)
    accounted = " ".join(result.mapped) + " " + " ".join(result.not_imported)
    assert not [n for n in result.not_imported if "has no param" in n]
    assert not [n for n in result.not_imported if any(s in n for s in STALE)], result.not_imported
    source = FIX / config
    keys = tomllib.loads(source.read_text()) if source.suffix == ".toml" else json.loads(source.read_text())
    for key in keys:
        if key not in ("concepts", "samples"):
            assert key in accounted, f"{key} is neither mapped nor listed"


# ---- kohya ------------------------------------------------------------------------------------------

def test_kohya_flux_memory_settings(tmp_path):
    result, r = convert("kohya", FIX / "kohya_flux_lora_memory.toml")
    load = one(r, "LoadModel")
    assert load["denoiser_quant"] == "fp8" and "text_encoder_quant" not in load  # fp8_base_unet: the DiT only
    assert load["text_max_length"] == 256
    assert {k: one(r, "TrainLoop").get(k) for k in ("blocks_to_swap", "offload_activations", "gradient_checkpointing")} \
        == {"blocks_to_swap": 18, "offload_activations": True, "gradient_checkpointing": True}
    flow = one(r, "FlowObjective")  # "sigma" with logit_normal: SD3's draw, shifted by kohya's default 3.0
    assert {k: flow.get(k) for k in ("timesteps", "logit_mean", "logit_scale", "shift", "shift_value", "guidance")} == \
        {"timesteps": "logit_normal", "logit_mean": 0.0, "logit_scale": 1.0, "shift": "fixed", "shift_value": 3.0,
         "guidance": 1.0}
    # the older Flux fixture: fp8_base quantizes the transformer; kohya keeps CLIP-L (and an fp16 T5) as they are
    result, r = convert("kohya", FIX / "kohya_flux_lora.toml")
    load = one(r, "LoadModel")
    assert load["denoiser_quant"] == "fp8" and "text_encoder_quant" not in load
    assert any("fp8_base" in n and "text_encoder_quant" in n for n in r["meta"]["imported"]["notes"])
    assert not [n for n in result.not_imported if n.startswith(("fp8_base", "blocks_to_swap"))]


def test_kohya_fp8_base_on_sd_quantizes_the_text_encoder_too_and_the_sigma_default(tmp_path):
    base = 'pretrained_model_name_or_path = "/m/sd15.safetensors"\nnetwork_module = "networks.lora"\n'
    _, r = convert("kohya", write(tmp_path, "a.toml", base + "fp8_base = true\n"))
    assert {k: one(r, "LoadModel").get(k) for k in ("denoiser_quant", "text_encoder_quant")} == \
        {"denoiser_quant": "fp8", "text_encoder_quant": "fp8"}
    _, r = convert("kohya", write(tmp_path, "b.toml", base + "fp8_base_unet = true\n"))
    assert one(r, "LoadModel")["denoiser_quant"] == "fp8" and "text_encoder_quant" not in one(r, "LoadModel")
    flux = ('pretrained_model_name_or_path = "/m/flux1-dev.safetensors"\nnetwork_module = "networks.lora_flux"\n'
            'ae = "/m/ae.safetensors"\n')
    _, r = convert("kohya", write(tmp_path, "c.toml", flux))  # timestep_sampling's default, sigma
    assert {k: one(r, "FlowObjective").get(k) for k in ("timesteps", "shift", "shift_value")} == \
        {"timesteps": "uniform", "shift": "fixed", "shift_value": 3.0}
    result, r = convert("kohya", write(tmp_path, "d.toml", flux + 'timestep_sampling = "sigma"\n'
                                       'weighting_scheme = "mode"\ndiscrete_flow_shift = 2.0\n'))
    assert one(r, "FlowObjective")["shift_value"] == 2.0
    assert "mode draw" in skipped(result, "weighting_scheme")


def test_kohya_fused_backward_and_full_finetune_limits(tmp_path):
    from app.importers.common import FUSED_OPTIMIZERS
    from app.ml.train.optim import FUSED_OPTIMIZERS as TRAIN_LOOP_FUSED

    assert FUSED_OPTIMIZERS == TRAIN_LOOP_FUSED  # the importers' copy (they do not import torch)
    result, r = convert("kohya", FIX / "kohya_sdxl_finetune_fused.toml")
    assert one(r, "TrainLoop")["fused_backward"] is True and one(r, "Optimizer")["optimizer"] == "adafactor"
    assert "LoadModel" in r["nodes"]["1"]["type"] and "denoiser_quant" not in one(r, "LoadModel")
    assert "full fine-tune" in skipped(result, "fp8_base") and "full fine-tune" in skipped(result, "blocks_to_swap")
    text = FIX.joinpath("kohya_sdxl_finetune_fused.toml").read_text().replace('"Adafactor"', '"AdamW8bit"')
    result, r = convert("kohya", write(tmp_path, "f.toml", text))
    assert "fused_backward" not in one(r, "TrainLoop") and "adamw8bit" in skipped(result, "fused_backward_pass")


# ---- OneTrainer -------------------------------------------------------------------------------------

def test_onetrainer_pivotal_tuning(tmp_path):
    result, r = convert("onetrainer", FIX / "onetrainer_sd15_pivotal.json")
    assert wire(r) == ["LoadModel", "Embedding", "LoadEmbedding", "LoRAInject"]
    assert one(r, "Embedding") == {"token": "<ohwx>", "num_vectors": 2, "init_text": "shape"}
    assert one(r, "LoadEmbedding") == {"path": str(FIX / "embeddings" / "style.safetensors"), "token": "<style>"}
    opt = one(r, "Optimizer")
    assert {k: opt.get(k) for k in ("embedding_lr", "stop_embedding_after", "stop_embedding_unit", "lr")} == \
        {"embedding_lr": 0.004, "stop_embedding_after": 1, "stop_embedding_unit": "steps", "lr": 0.0003}
    assert {k: one(r, "LoadModel").get(k) for k in ("denoiser_quant", "text_encoder_quant")} == \
        {"denoiser_quant": "fp8", "text_encoder_quant": "fp8"}
    train = one(r, "TrainLoop")  # unet.offload_fraction 0.5 of SD 1.5's 4 + 4 blocks
    assert {k: train.get(k) for k in ("blocks_to_swap", "offload_activations", "gradient_checkpointing")} == \
        {"blocks_to_swap": 4, "offload_activations": True, "gradient_checkpointing": True}
    assert one(r, "Save")["bundle_embeddings"] is True and one(r, "Save")["what"] == "adapter"
    # the config's `embedding` is OneTrainer's EMBEDDING-method one: with a LoRA it is not trained there either
    assert "training_method EMBEDDING" in skipped(result, "embedding")


def test_onetrainer_embedding_training_method(tmp_path):
    result, r = convert("onetrainer", FIX / "onetrainer_sdxl_embedding.json")
    assert wire(r) == ["LoadModel", "Embedding"] and not nodes(r, "LoRAInject")
    assert one(r, "Embedding") == {"token": "<mychar>", "num_vectors": 3, "init_text": "a woman", "encoders": "clip_l"}
    assert {k: one(r, "Optimizer").get(k) for k in ("embedding_lr", "stop_embedding_after", "stop_embedding_unit")} \
        == {"embedding_lr": 0.005, "stop_embedding_after": 40, "stop_embedding_unit": "epochs"}
    assert {k: one(r, "LoadModel").get(k) for k in ("denoiser_quant", "text_encoder_quant")} == \
        {"denoiser_quant": "nf4", "text_encoder_quant": "int8"}
    # before config version 11: layer_offload_fraction with gradient_checkpointing CPU_OFFLOADED
    train = one(r, "TrainLoop")
    assert {k: train.get(k) for k in ("blocks_to_swap", "offload_activations", "gradient_checkpointing")} == \
        {"blocks_to_swap": 3, "offload_activations": True, "gradient_checkpointing": True}
    assert one(r, "Save")["what"] == "embedding" and one(r, "Save")["path"] == "mychar.safetensors"


def test_onetrainer_quantized_dtypes_and_offloading_limits(tmp_path):
    base = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_XL_10_BASE", "base_model_name": "/m/xl"}
    # different formats: one text_encoder_quant for both, the larger encoder's
    result, r = convert("onetrainer", write(tmp_path, "a.json", {
        **base, "text_encoder": {"weight_dtype": "FLOAT_8"}, "text_encoder_2": {"weight_dtype": "NFLOAT_4"}}))
    assert one(r, "LoadModel")["text_encoder_quant"] == "nf4"
    assert "one format for every text encoder" in skipped(result, "text_encoder.weight_dtype")
    # only the small encoder quantized: nothing is quantized that the config keeps whole
    flux = {**base, "model_type": "FLUX_DEV_1", "transformer": {"weight_dtype": "FLOAT_8"},
            "text_encoder": {"weight_dtype": "NFLOAT_4"}, "text_encoder_2": {"weight_dtype": "BFLOAT_16"}}
    result, r = convert("onetrainer", write(tmp_path, "b.json", flux))
    assert one(r, "LoadModel")["denoiser_quant"] == "fp8" and "text_encoder_quant" not in one(r, "LoadModel")
    assert "text_encoder_2 is not quantized" in skipped(result, "text_encoder.weight_dtype")
    # a full fine-tune trains its UNet: quantized storage cannot learn, and block swap streams frozen blocks
    ft = {**base, "training_method": "FINE_TUNE", "unet": {"train": True, "weight_dtype": "FLOAT_8",
                                                           "offload_fraction": 0.5}}
    result, r = convert("onetrainer", write(tmp_path, "c.json", ft))
    assert "denoiser_quant" not in one(r, "LoadModel") and "blocks_to_swap" not in one(r, "TrainLoop")
    assert "frozen" in skipped(result, "unet.weight_dtype") and "full fine-tune" in skipped(result, "unet.offload_fraction")
    # the old layer_offload_fraction applied only with CPU_OFFLOADED checkpointing
    result, r = convert("onetrainer", write(tmp_path, "d.json", {**base, "gradient_checkpointing": "ON",
                                                                  "layer_offload_fraction": 0.5}))
    assert "blocks_to_swap" not in one(r, "TrainLoop") and "CPU_OFFLOADED" in skipped(result, "layer_offload_fraction")
    # Flux: 57 blocks; the fused backward pass of OneTrainer's optimizer
    flux = {**flux, "transformer": {"offload_fraction": 0.25}, "optimizer": {"optimizer": "ADAFACTOR",
                                                                              "fused_back_pass": True}}
    _, r = convert("onetrainer", write(tmp_path, "e.json", flux))
    assert one(r, "TrainLoop")["blocks_to_swap"] == 14 and one(r, "TrainLoop")["fused_backward"] is True


def test_onetrainer_embedding_settings_without_embeddings(tmp_path):
    base = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "/m/sd15",
            "embedding_learning_rate": None, "bundle_additional_embeddings": True, "additional_embeddings": []}
    result, r = convert("onetrainer", write(tmp_path, "a.json", base))  # what every saved LoRA config holds
    assert not nodes(r, "Embedding") and not [n for n in result.not_imported if "embedding" in n]
    # a full fine-tune keeps no adapter on its wire: its additional embeddings are listed, not loaded
    extra = [{"placeholder": "<style>", "model_name": "style.safetensors", "train": False}]
    result, r = convert("onetrainer", write(tmp_path, "b.json", {**base, "training_method": "FINE_TUNE",
                                                                  "additional_embeddings": extra}))
    assert not nodes(r, "LoadEmbedding") and "full fine-tune" in skipped(result, "additional_embeddings")


# ---- the recipes validate and train -------------------------------------------------------------------

def tiny(recipe: dict, tmp_path: Path, model: str) -> dict:
    """The imported recipe with its paths swapped for the tiny model, generated images and, for
    LoadEmbedding, a generated embedding file; two steps, the memory params left on."""
    from app.ml.data.demo import make_shapes_dataset

    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, n_per_class=1, size=64, seed=0)
    for node in recipe["nodes"].values():
        p = node["params"]
        if node["type"] == "LoadModel":
            p.update(source=model, vae="", ae="", clip_l="", t5xxl="")
        elif node["type"] == "Concept":
            p.update(folder=str(data))
        elif node["type"] == "Bucketer":
            p.update(resolution="64", batch_size=1, quantization=16 if "flux" in model else 8)
        elif node["type"] == "LoadEmbedding":
            import torch
            from safetensors.torch import save_file

            path = tmp_path / "style.safetensors"  # A1111's layout, at the tiny CLIP's width (32)
            save_file({"emb_params": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, str(path))
            p["path"] = str(path)
        elif node["type"] == "TrainLoop":
            # the tiny denoisers have 4 blocks: one streamed keeps the swap on
            p.update(max_steps=2, sample_prompts="", train_dtype="fp32", blocks_to_swap=min(1, p.get("blocks_to_swap", 0)))
    return recipe


@pytest.mark.parametrize("name", list(NEW))
def test_imported_recipes_validate(tmp_path, name):
    tool, config = NEW[name]
    out = tmp_path / "recipe.json"
    assert main(["import", tool, str(FIX / config), "-o", str(out)]) == 0
    model = {"ot_sd15_pivotal": "builtin:tiny-sd", "kohya_flux_memory": "builtin:tiny-flux"}.get(name,
                                                                                                 "builtin:tiny-sdxl")
    out.write_text(json.dumps(tiny(json.loads(out.read_text()), tmp_path, model)))
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize("name,model", [("ot_sd15_pivotal", "builtin:tiny-sd"),
                                        ("kohya_flux_memory", "builtin:tiny-flux")])
def test_imported_memory_recipe_trains_two_steps(tmp_path, capsys, name, model):
    tool, config = NEW[name]
    out = tmp_path / "recipe.json"
    assert main(["import", tool, str(FIX / config), "-o", str(out)]) == 0
    recipe = tiny(json.loads(out.read_text()), tmp_path, model)
    load = next(n["params"] for n in recipe["nodes"].values() if n["type"] == "LoadModel")
    assert load["denoiser_quant"] == "fp8"
    out.write_text(json.dumps(recipe))
    capsys.readouterr()
    assert main(["run", str(out), "--workspace", str(tmp_path / "ws")]) == 0
    log = capsys.readouterr()
    text = log.out + log.err
    assert "block swap: 1 of" in text
    saved = sorted(p.name for p in (tmp_path / "ws").glob("*.safetensors"))
    assert saved, sorted(p.name for p in (tmp_path / "ws").iterdir())
    if name == "ot_sd15_pivotal":  # the trained embedding stopped after step 1 and is bundled into the LoRA
        from safetensors.torch import load_file

        assert "embedding training stopped" in text
        assert any(k.startswith("bundle_emb.<ohwx>") for k in load_file(str(tmp_path / "ws" / saved[0])))
