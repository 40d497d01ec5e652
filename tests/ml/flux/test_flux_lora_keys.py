"""Flux LoRA layouts: ours (diffusers modules) <-> kohya/BFL, ComfyUI and diffusers/PEFT, weight-exact."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from app.ml.flux import latents as L
from app.ml.flux import lora_keys as LK
from app.ml.flux import tiny


@pytest.fixture(scope="module")
def model():
    return tiny.build_transformer(guidance=True)


def _targets(model) -> list[str]:
    """Every linear a Flux LoRA preset may target, minus single block 1's proj_mlp (a partially covered linear1)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n in names if n != "single_transformer_blocks.1.proj_mlp"]


def _loras(model, names, seed=0, rank=4, alpha=2.0, zero_up=False, vary=False):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for i, n in enumerate(names):
        w = mods[n].weight
        r = 2 if vary and i % 5 == 0 else rank  # a few modules of another rank ...
        a = 8.0 if vary and i % 7 == 0 else alpha  # ... and another alpha
        up = torch.zeros(w.shape[0], r) if zero_up else torch.randn(w.shape[0], r, generator=g) * 0.1
        out[n] = LK.LoraWeights(torch.randn(r, w.shape[1], generator=g) * 0.1, up, a)
    return out


def _same_deltas(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n].delta(), b[n].delta(), atol=1e-6, rtol=0), n


@pytest.mark.parametrize("vary", [False, True], ids=["uniform", "mixed_ranks_alphas"])
@pytest.mark.parametrize("layout", ["kohya", "comfy", "peft"])
def test_round_trip_keeps_every_weight_change(model, layout, vary):
    ours = _loras(model, _targets(model), vary=vary)
    if layout == "peft":
        tensors, meta = LK.to_peft(ours)
    else:
        tensors, meta = (LK.to_kohya(ours) if layout == "kohya" else LK.to_comfy(ours)), None
    back = LK.from_file_tensors(tensors, meta)
    _same_deltas(ours, back)
    assert {n: lo.rank for n, lo in back.items()} == {n: lo.rank for n, lo in ours.items()}
    if not vary:  # parts fused with another scale keep their weight change, folded into the up (alpha follows the group)
        assert {n: lo.alpha for n, lo in back.items()} == {n: lo.alpha for n, lo in ours.items()}


def test_kohya_names_and_fused_blocks(model):
    ours = _loras(model, _targets(model), rank=4, alpha=4.0)
    k = LK.to_kohya(ours)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert k[qkv + ".lora_up.weight"].shape == (96, 12) and k[qkv + ".lora_down.weight"].shape == (12, 32)
    assert float(k[qkv + ".alpha"]) == 12.0  # 3 × rank, so alpha / rank stays 1
    for name in ("lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_mod_lin",
                 "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear2", "lora_unet_single_blocks_0_modulation_lin",
                 "lora_unet_final_layer_linear", "lora_unet_guidance_in_in_layer", "lora_unet_txt_in"):
        assert name + ".lora_up.weight" in k, name
    # the fused weight change is the parts' changes stacked; a part without a LoRA gets zero rows
    fused = LK.to_bfl(ours)["single_blocks.1.linear1"].delta()
    parts = [ours[f"single_transformer_blocks.1.attn.to_{p}"].delta() for p in "qkv"]
    assert torch.allclose(fused[:96], torch.cat(parts), atol=1e-7) and fused[96:].abs().max() == 0
    assert fused.shape == (96 + 128, 32)


def test_dense_fused_lora_from_another_trainer_splits_exactly():
    g = torch.Generator().manual_seed(3)
    dense = LK.LoraWeights(torch.randn(6, 32, generator=g), torch.randn(96, 6, generator=g), 3.0)
    lin1 = LK.LoraWeights(torch.randn(8, 32, generator=g), torch.randn(224, 8, generator=g), 8.0)
    parts = LK.from_bfl({"double_blocks.0.txt_attn.qkv": dense, "single_blocks.0.linear1": lin1})
    full = dense.delta()
    for i, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        lo = parts[f"transformer_blocks.0.attn.{p}"]
        assert lo.rank == 6 and torch.allclose(lo.delta(), full[32 * i:32 * (i + 1)], atol=1e-9)
    assert torch.allclose(parts["single_transformer_blocks.0.proj_mlp"].delta(), lin1.delta()[96:], atol=1e-9)


def test_fresh_zero_lora_keeps_its_ranks(model):
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
    ours = {n: LK.LoraWeights(torch.randn(4, 32), torch.zeros(32, 4), 4.0) for n in names}
    back = LK.from_file_tensors(LK.to_kohya(ours))
    assert {n: (lo.rank, lo.alpha) for n, lo in back.items()} == {n: (4, 4.0) for n in names}
    assert all(torch.equal(back[n].down, ours[n].down) for n in names)


def test_bad_keys_name_the_key(model):
    ours = _loras(model, ["transformer_blocks.0.attn.to_q"])
    k = LK.to_kohya(ours)
    k["lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight"] = torch.zeros(1, 1)
    k["lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight"] = torch.zeros(1, 1)
    with pytest.raises(LK.FluxLoraKeyError, match=r"LoadLoRA 'style': my\.safetensors: 'lora_unet_double_blocks_0_img_attn_qkvx'"):
        LK.from_file_tensors(k, where="LoadLoRA 'style': my.safetensors")
    with pytest.raises(LK.FluxLoraKeyError, match="lacks its up weight"):
        LK.from_file_tensors({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64)})
    with pytest.raises(LK.FluxLoraKeyError, match="not a LoRA-able"):
        LK.to_bfl({"transformer_blocks.0.attn.norm_q": ours["transformer_blocks.0.attn.to_q"]})
    with pytest.raises(LK.FluxLoraKeyError, match="not a Flux transformer LoRA"):
        LK.from_file_tensors({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(1)})


def _forward(transformer):
    g = torch.Generator().manual_seed(1)
    x = L.pack(torch.randn(1, 16, 4, 4, generator=g))
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                           pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                           guidance=torch.tensor([1.0]), img_ids=L.image_ids(4, 4), txt_ids=L.text_ids(5), return_dict=False)[0]


def _merged(model, loras):
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for n, lo in loras.items():
            mods[n].weight += lo.delta().float()
    return m


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_diffusers_load_lora_weights_reads_our_file(model, tmp_path, layout):
    """diffusers' FluxPipeline loads our file and its transformer then computes what the merged weights do."""
    pipe = tiny.tiny_flux_pipeline(dict(tiny.build_tiny_flux(tokenizer_cache=tmp_path / "tok"), transformer=copy.deepcopy(model)))
    targets = [n for n in _targets(model) if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    if layout == "kohya":  # diffusers' kohya reader splits linear1 at the real model's 3072 width: leave it out
        targets = [n for n in targets if not (n.startswith("single_") and (".attn.to_" in n or "proj_mlp" in n))]
    ours = _loras(model, targets, rank=4, alpha=2.0)
    if layout == "peft":
        tensors, meta = LK.to_peft(ours)
    else:
        tensors, meta = LK.to_kohya(ours), {"format": "pt"}
    path = tmp_path / f"flux_lora_{layout}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert loaded == set(ours)
    expected = _forward(_merged(model, ours))
    got = _forward(pipe.transformer)
    assert not torch.allclose(expected, _forward(model), atol=1e-4)  # the LoRA does change the output
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
