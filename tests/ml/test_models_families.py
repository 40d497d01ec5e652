"""Model families: detection from checkpoint keys / diffusers configs, and no torch at import."""

import subprocess
import sys
from pathlib import Path

import pytest

from app.ml.models.families import (
    FAMILIES,
    ModelLoadError,
    detect_diffusers_family,
    detect_single_file_family,
    get_family,
)

ROOT = Path(__file__).resolve().parents[2]

UNET = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"]
VAE = ["first_stage_model.encoder.conv_in.weight"]
SD15_KEYS = UNET + VAE + ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
SD2_KEYS = UNET + VAE + [
    "cond_stage_model.model.token_embedding.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
]
SDXL_KEYS = UNET + VAE + [
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.text_projection",
]


def test_importing_families_does_not_import_torch():
    code = (
        "import sys; import app.ml.models.families, app.ml.models; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "keys, family_id",
    [(SD15_KEYS, "sd15"), (SD2_KEYS, "sd2"), (SDXL_KEYS, "sdxl")],
)
def test_detects_each_family_from_keys(keys, family_id):
    assert detect_single_file_family(keys).id == family_id


def test_sd2_defaults_to_epsilon_and_v_needs_evidence():
    assert detect_single_file_family(SD2_KEYS).prediction_type == "epsilon"
    assert detect_single_file_family(SD2_KEYS + ["v_pred"]).id == "sd2-v"
    meta = {"modelspec.prediction_type": "v"}
    assert detect_single_file_family(SD2_KEYS, metadata=meta).id == "sd2-v"
    arch = {"modelspec.architecture": "stable-diffusion-v2-768-v"}
    assert detect_single_file_family(SD2_KEYS, metadata=arch).id == "sd2-v"
    yaml_text = "model:\n  params:\n    parameterization: \"v\"  # 768\n"
    assert detect_single_file_family(SD2_KEYS, original_config_text=yaml_text).id == "sd2-v"
    # the marker means nothing for SD1.5 / SDXL layouts
    assert detect_single_file_family(SD15_KEYS + ["v_pred"]).id == "sd15"


def test_unknown_layout_error_names_file_and_what_was_looked_for():
    with pytest.raises(ModelLoadError) as e:
        detect_single_file_family(["foo.bar.weight", "baz.qux"], source="mystery.safetensors")
    msg = str(e.value)
    assert "mystery.safetensors" in msg
    for prefix in ("conditioner.embedders.1.model.", "cond_stage_model.model.", "cond_stage_model.transformer."):
        assert prefix in msg
    assert "foo.bar" in msg


@pytest.mark.parametrize(
    "keys, words",
    [
        (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["conditioner.embedders.0.model.token_embedding.weight"] + UNET, "refiner"),
        (["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"], "no UNet"),
        (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "diffusers"),
        ([], "no tensors"),
    ],
)
def test_recognised_but_unloadable_layouts_say_what_they_are(keys, words):
    with pytest.raises(ModelLoadError, match=words):
        detect_single_file_family(keys, source="x.safetensors")


def test_family_facts():
    sd15, sdxl = get_family("sd15"), get_family("sdxl")
    assert (sd15.bucket_quantization, sdxl.bucket_quantization) == (8, 64)
    assert sd15.text_embedding_dim == 768 and sdxl.text_embedding_dim == 2048
    assert sdxl.uses_time_ids and not sd15.uses_time_ids
    assert [te.pooled for te in sdxl.text_encoders] == [False, True]
    assert all(te.hidden_layer == -2 and not te.final_layer_norm for te in sdxl.text_encoders)
    assert get_family("sd2-v").prediction_type == "v_prediction"
    assert get_family("sd2-v").kohya_metadata["ss_v2"] == "True"
    assert sd15.kohya_metadata["ss_base_model_version"] == "sd_v1"
    assert get_family("SD1.5") is sd15
    with pytest.raises(ModelLoadError, match="known families"):
        get_family("sd9")
    for fam in FAMILIES.values():
        root = "app/ml/models/configs" if fam.denoiser == "unet" else "app/ml/flux/configs"
        cfg = ROOT / root / fam.config_dir
        assert (cfg / fam.denoiser / "config.json").is_file() and (cfg / "scheduler/scheduler_config.json").is_file()


def test_detects_family_from_diffusers_configs():
    assert detect_diffusers_family({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 768}).id == "sd15"
    assert detect_diffusers_family({}, {"cross_attention_dim": 1024}).id == "sd2"
    sched_v = {"prediction_type": "v_prediction"}
    assert detect_diffusers_family({}, {"cross_attention_dim": 1024}, None, sched_v).id == "sd2-v"
    assert detect_diffusers_family({"_class_name": "StableDiffusionXLPipeline"}, {}).id == "sdxl"
    assert detect_diffusers_family({}, {"addition_embed_type": "text_time"}).id == "sdxl"
    with pytest.raises(ModelLoadError, match="not supported"):
        detect_diffusers_family({"_class_name": "FluxPipeline"}, {})
