"""Flux LoHa, LoKr and DoRA LoRAs and CLIP-L text-encoder LoRAs: written by Save (kohya/BFL and ComfyUI
layouts; per-projection ``lycoris_`` keys on fused q/k/v/mlp weights) and read back with the same weight
changes, so training can continue from them."""

import pytest
import torch
from safetensors import safe_open

from app.ml.adapters import AdapterConfig, AdapterError, component_modules, create_adapter_set, load_adapter_file
from app.ml.models import load_model
from app.ml.save import save_adapter


@pytest.fixture(scope="module")
def flux():
    return load_model("builtin:tiny-flux")


def _aset(bundle, algo, seed=5):
    """Every trainable tensor moved off its init, so a zero factor cannot hide a wrong key."""
    aset = create_adapter_set(bundle, AdapterConfig(algorithm=algo, rank=4, alpha=2.0,
                                                    targets={"unet": "full", "text_encoder": "attn-mlp"}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in aset.entries():
            for p in e.module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return aset


def _deltas(bundle, aset):
    comps = component_modules(bundle)
    out = {}
    for e in aset.entries():
        base = comps[e.component].get_submodule(e.name)
        out[(e.component, e.name)] = e.module.merged_weight(base).double() - base.weight.detach().double()
    return out


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
@pytest.mark.parametrize("algo", ["loha", "lokr", "dora", "lora"])
def test_lycoris_and_text_encoder_loras_round_trip(flux, tmp_path, algo, layout):
    aset = _aset(flux, algo)
    path = save_adapter(aset, tmp_path / f"{algo}_{layout}.safetensors", layout=layout, dtype="fp32")
    back = load_adapter_file(path, flux)
    assert back.config.algorithm == algo
    ours, theirs = _deltas(flux, aset), _deltas(flux, back)
    assert set(theirs) == set(ours)
    assert {c for c, _ in ours} == {"transformer", "text_encoder"}
    for key, delta in ours.items():
        assert delta.abs().max() > 0, key
        assert torch.allclose(theirs[key], delta, atol=1e-6), key


def test_lycoris_keys_are_bfl_names_and_per_projection_on_fused_weights(flux, tmp_path):
    path = save_adapter(_aset(flux, "loha"), tmp_path / "loha.safetensors", layout="kohya", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_proj.hada_w1_a" in keys
    assert "lora_unet_single_blocks_0_linear2.hada_w2_b" in keys
    # q/k/v and the single block's mlp input share one fused BFL weight: ComfyUI's per-projection keys
    assert "lycoris_transformer_blocks_0_attn_to_q.hada_w1_a" in keys
    assert "lycoris_single_transformer_blocks_0_proj_mlp.alpha" in keys
    assert not any(k.startswith(("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1.")) for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)


def test_dora_uses_per_projection_keys_and_peft_layout_is_refused_by_name(flux, tmp_path):
    aset = _aset(flux, "dora")
    path = save_adapter(aset, tmp_path / "dora.safetensors", layout="comfyui", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "lycoris_transformer_blocks_0_attn_add_k_proj.dora_scale" in keys
    assert "diffusion_model.double_blocks.0.txt_attn.proj.dora_scale" in keys
    with pytest.raises(AdapterError, match="PEFT layout holds plain LoRA only.*kohya or comfyui"):
        save_adapter(aset, tmp_path / "dora_peft.safetensors", layout="peft")


def test_a_lycoris_module_on_a_fused_bfl_weight_is_refused_by_name(flux, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "fused_lokr.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(2, 2),
               "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.ones(48, 16),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(AdapterError, match=r"fused_lokr\.safetensors.*img_attn\.qkv.*no exact split.*per-projection"):
        load_adapter_file(path, flux)


def test_clip_lora_round_trips_in_the_peft_layout(flux, tmp_path):
    aset = _aset(flux, "lora")
    path = save_adapter(aset, tmp_path / "peft.safetensors", layout="peft", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in f.keys())
    back = load_adapter_file(path, flux)
    ours, theirs = _deltas(flux, aset), _deltas(flux, back)
    assert set(theirs) == set(ours)
    for key, delta in ours.items():
        assert torch.allclose(theirs[key], delta, atol=1e-6), key
