"""LoRA files: key names other tools read, real alpha, metadata, dtypes, round trips, safe writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from app.ml.adapters import AdapterConfig, AdapterError, attached, create_adapter_set, load_adapter_file
from app.ml.save import save_adapter


def _random_set(bundle, algorithm="lora", **kw):
    tes = {spec.name: "attn-mlp" for spec in bundle.family.text_encoders}
    cfg = AdapterConfig(algorithm=algorithm, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                        targets={"unet": "full", **tes}, **kw)
    aset = create_adapter_set(bundle, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in aset.named_parameters():
            if not name.endswith("dora_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return aset


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _outputs(bundle, aset):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with attached(bundle, aset), torch.no_grad():
        emb = bundle.encode_prompts(["a red cube"])
        kw = {}
        if bundle.family.uses_time_ids:
            kw["added_cond_kwargs"] = {"text_embeds": emb["pooled_prompt_embeds"], "time_ids": bundle.add_time_ids((64, 64))}
        return emb["prompt_embeds"], bundle.unet(x, torch.tensor([300]), emb["prompt_embeds"], **kw).sample


def test_kohya_keys_sd15(sd, tmp_path):
    aset = _random_set(sd, "locon")
    path = save_adapter(aset, tmp_path / "x", recipe={"format_version": 1}, step=12, epoch=3)
    tensors, meta = _read(path)
    prefixes = {k.split(".")[0] for k in tensors}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in prefixes
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in prefixes
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in prefixes
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in prefixes
    for p in prefixes:
        assert {f"{p}.lora_down.weight", f"{p}.lora_up.weight", f"{p}.alpha"} <= set(tensors)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 2.0  # the real alpha
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0  # conv_alpha
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2  # conv_rank
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_steps"] == "12" and meta["ss_epoch"] == "3"
    assert json.loads(meta["nodetrainer_recipe"]) == {"format_version": 1}
    assert meta["nodetrainer_base_family"] == "sd15" and meta["nodetrainer_base_model_hash"] == sd.identity
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"  # as sd-scripts writes for LyCORIS


def test_kohya_keys_sdxl_use_sgm_unet_names_and_te1_te2(sdxl, tmp_path):
    aset = _random_set(sdxl)
    tensors, meta = _read(save_adapter(aset, tmp_path / "xl", dtype="bf16"))
    prefixes = {k.split(".")[0] for k in tensors}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in prefixes
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in prefixes
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in prefixes
    assert "lora_unet_middle_block_1_proj_in" in prefixes
    assert not any(p.startswith(("lora_unet_down_blocks", "lora_unet_mid_block")) for p in prefixes)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize("layout", ["kohya", "peft", "comfyui"])
@pytest.mark.parametrize("algorithm", ["lora", "locon", "loha", "lokr", "dora"])
def test_round_trip_through_file(sd, tmp_path, layout, algorithm):
    aset = _random_set(sd, algorithm)
    if layout == "peft" and algorithm in ("loha", "lokr", "dora"):
        with pytest.raises(AdapterError, match="kohya"):
            save_adapter(aset, tmp_path / "x", layout=layout)
        return
    path = save_adapter(aset, tmp_path / "x", layout=layout, dtype="fp32")
    back = load_adapter_file(path, sd)
    assert back.config.algorithm == aset.config.algorithm
    assert len(back) == len(aset) and back.num_parameters() == aset.num_parameters()
    for e in aset.entries():
        assert float(back.get(e.component, e.name).alpha) == float(e.module.alpha)
    want_te, want_unet = _outputs(sd, aset)
    got_te, got_unet = _outputs(sd, back)
    torch.testing.assert_close(got_te, want_te)
    torch.testing.assert_close(got_unet, want_unet)
    base_unet = _outputs(sd, None)[1]
    assert (want_unet - base_unet).abs().max() > 1e-4


def test_sdxl_round_trip(sdxl, tmp_path):
    aset = _random_set(sdxl, "locon")
    back = load_adapter_file(save_adapter(aset, tmp_path / "xl", dtype="fp32"), sdxl)
    torch.testing.assert_close(_outputs(sdxl, back)[1], _outputs(sdxl, aset)[1])


def test_comfyui_layout_names(sd, tmp_path):
    tensors, _ = _read(save_adapter(_random_set(sd), tmp_path / "c", layout="comfyui"))
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    from app.ml.models.original_layout import bundle_to_original_state_dict

    # every UNet key names a real tensor of the original-layout model ComfyUI holds
    original = {k.removeprefix("model.") for k in bundle_to_original_state_dict(sd)}
    unet = [p for p in prefixes if p.startswith("diffusion_model.")]
    assert unet and all(p + ".weight" in original for p in unet)
    assert any(p.startswith("lora_te_text_model_encoder_layers_") for p in prefixes)


def _comfy_delta(tensors, prefix, shape):
    """LoHa / LoKr deltas computed the way ComfyUI's weight adapters do, from the file alone."""
    alpha = tensors[prefix + ".alpha"].item()
    if prefix + ".hada_w1_a" in tensors:
        w1a, w1b = tensors[prefix + ".hada_w1_a"], tensors[prefix + ".hada_w1_b"]
        w2a, w2b = tensors[prefix + ".hada_w2_a"], tensors[prefix + ".hada_w2_b"]
        d = (w1a @ w1b) * (w2a @ w2b) * (alpha / w1b.shape[0])
        return d.reshape(shape)
    w1 = tensors[prefix + ".lokr_w1"]
    if prefix + ".lokr_w2" in tensors:
        w2, scale = tensors[prefix + ".lokr_w2"], 1.0
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
    else:
        a, b = tensors[prefix + ".lokr_w2_a"], tensors[prefix + ".lokr_w2_b"]
        w2, scale = a @ b, alpha / b.shape[0]
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lycoris_keys_and_maths_as_comfyui_reads_them(sd, tmp_path, algorithm):
    aset = _random_set(sd, algorithm, factor=4)
    tensors, meta = _read(save_adapter(aset, tmp_path / algorithm, dtype="fp32"))
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == algorithm
    names = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
             "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}[algorithm]
    assert {k.split(".", 1)[1] for k in tensors} <= names
    for e in list(aset.entries())[::7]:
        prefix = "lora_unet_" + e.name.replace(".", "_") if e.component == "unet" else "lora_te_text_model_" + e.name.replace(".", "_")
        base = (sd.unet if e.component == "unet" else sd.text_encoders[0]).get_submodule(e.name)
        want = e.module.merged_weight(base) - base.weight
        torch.testing.assert_close(_comfy_delta(tensors, prefix, base.weight.shape), want, rtol=1e-4, atol=1e-6)


def test_saves_never_clobber_unless_asked(sd, tmp_path):
    aset = _random_set(sd)
    p0 = save_adapter(aset, tmp_path / "lora.safetensors")
    p1 = save_adapter(aset, tmp_path / "lora.safetensors")
    assert (p0.name, p1.name) == ("lora.safetensors", "lora_1.safetensors")
    p2 = save_adapter(aset, tmp_path / "lora.safetensors", overwrite=True, step=7)
    assert p2 == p0 and _read(p0)[1]["ss_steps"] == "7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "lora_1.safetensors"]  # no temp files left


def test_loading_a_lora_for_another_model_names_the_keys(sd, sdxl, tmp_path):
    path = save_adapter(_random_set(sdxl), tmp_path / "xl")
    with pytest.raises(AdapterError, match="match no layer"):
        load_adapter_file(path, sd)
