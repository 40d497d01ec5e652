"""Quantized base weights in the product: load_model's quant, adapters of every algorithm training on
quantized layers (QLoRA), sampling on them, saved LoRAs unchanged and recording the base precision."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from app.ml.adapters import AdapterConfig, attached, create_adapter_set, load_adapter_file
from app.ml.memory.quant import QuantizedLinear
from app.ml.models import ModelLoadError, load_model


def _storage(module) -> dict[str, torch.Tensor]:
    """Every quantized layer's packed storage, copied (to compare before and after training)."""
    return {f"{n}.{i}": t.clone() for n, m in module.named_modules() if isinstance(m, QuantizedLinear)
            for i, t in enumerate(m.storage())}


@pytest.fixture(scope="module")
def bases():
    """tiny-sd plain, nf4 and fp8 (denoiser and text encoder quantized)."""
    out = {"bf16": load_model("builtin:tiny-sd", dtypes={"unet": "bf16", "text_encoder": "bf16"})}
    for fmt in ("nf4", "fp8"):
        out[fmt] = load_model("builtin:tiny-sd", dtypes={"unet": "bf16", "text_encoder": "bf16"},
                              quant={"unet": fmt, "text_encoder": fmt})
    return out


def test_quant_requests_are_checked_by_component_and_format():
    with pytest.raises(ModelLoadError, match="cannot quantize vae"):
        load_model("builtin:tiny-sd", quant={"vae": "nf4"})
    with pytest.raises(ModelLoadError, match="unknown weight format 'fp4' for the unet"):
        load_model("builtin:tiny-sd", quant={"unet": "fp4"})
    plain = load_model("builtin:tiny-sd", quant={"unet": "none", "text_encoder": "none"})
    assert plain.quant == {} and not _storage(plain.unet)


@pytest.mark.parametrize("fmt,algorithm", [("nf4", "lora"), ("fp8", "lora"), ("nf4", "dora"), ("fp8", "dora"),
                                           ("nf4", "loha"), ("fp8", "lokr"), ("nf4", "locon")])
def test_adapters_train_on_quantized_layers(bases, fmt, algorithm):
    bundle = bases[fmt]
    config = AdapterConfig(algorithm=algorithm, rank=4, alpha=4, targets={"unet": "attn-mlp", "text_encoder": "attn-mlp"})
    aset = create_adapter_set(bundle, config)
    quantized = {e.name for e in aset.entries() if e.component == "unet"
                 and isinstance(bundle.unet.get_submodule(e.name), QuantizedLinear)}
    assert quantized  # the presets target quantized layers
    before, start = _storage(bundle.unet), {k: v.clone() for k, v in aset.state_dict().items()}
    opt = torch.optim.AdamW(aset.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.bfloat16)
    losses = []
    with attached(bundle, aset):
        for _ in range(4):
            enc = bundle.encode_prompts(["a red cube", "a blue ball"], with_grad=True)["prompt_embeds"]
            loss = bundle.unet(x, torch.tensor([100, 700]), enc.to(torch.bfloat16)).sample.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aset.parameters() if p.requires_grad)
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in aset.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and any(k.split(".")[0] == "adapters" for k in changed)
    after = _storage(bundle.unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.grad is not None for p in bundle.unet.parameters())


def test_dora_magnitude_is_the_dequantized_weight_norm(bases):
    """DoRA starts from the base weight's column norms; on a quantized layer that is the dequantized weight's."""
    bundle = bases["nf4"]
    aset = create_adapter_set(bundle, AdapterConfig(algorithm="dora", rank=4, alpha=4, targets={"unet": "attn-only"}))
    entry = next(e for e in aset.entries() if isinstance(bundle.unet.get_submodule(e.name), QuantizedLinear))
    layer = bundle.unet.get_submodule(entry.name)
    w = layer.dequantize(torch.float32)
    norm = w.norm(dim=0) if entry.module.dora_scale.numel() == w.shape[1] else w.norm(dim=1)
    assert torch.allclose(entry.module.dora_scale.detach().flatten(), norm, rtol=1e-4, atol=1e-6)
    # untrained (zero up-projection) DoRA leaves the quantized layer's output as it was
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with attached(bundle, aset):
        adapted = layer(x)
    assert torch.allclose(adapted.float(), layer(x).float(), atol=2e-2)


def test_sampling_on_a_quantized_base_is_close_to_bf16(bases):
    from app.ml.sampling import sample_images

    out = {}
    for fmt in ("bf16", "fp8"):
        result = sample_images(bases[fmt], ["a red circle"], width=16, height=16, steps=4, cfg=7.0, seed=3,
                               sampler="euler")
        out[fmt] = result.latents[0].float()
        assert torch.isfinite(out[fmt]).all() and result.images[0].size == (16, 16)
    rel = ((out["fp8"] - out["bf16"]).norm() / out["bf16"].norm()).item()
    assert rel < 0.25, rel


def _train_lora(bundle, steps=3):
    aset = create_adapter_set(bundle, AdapterConfig(algorithm="lora", rank=4, alpha=4, targets={"unet": "attn-mlp"}))
    opt = torch.optim.AdamW(aset.parameters(), lr=2e-2)
    dtype = bundle.dtypes["unet"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    enc = bundle.encode_prompts(["a red cube", "a blue ball"])["prompt_embeds"].to(dtype)
    with attached(bundle, aset):
        for _ in range(steps):
            loss = bundle.unet(x, torch.tensor([100, 700]), enc).sample.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return aset


def test_lora_saved_from_an_nf4_base_has_the_same_keys_and_applies_on_bf16(bases, tmp_path):
    from app.ml.save import save_adapter

    q = save_adapter(_train_lora(bases["nf4"]), tmp_path / "nf4.safetensors", dtype="fp32")
    p = save_adapter(_train_lora(bases["bf16"]), tmp_path / "bf16.safetensors", dtype="fp32")
    with safe_open(str(q), "pt") as a, safe_open(str(p), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())
        meta_q, meta_p = a.metadata(), b.metadata()
    assert json.loads(meta_q["nodetrainer_base_precision"]) == {"unet": "nf4", "text_encoder": "nf4"}
    assert json.loads(meta_p["nodetrainer_base_precision"]) == {"unet": "bf16", "text_encoder": "bf16"}
    assert meta_q["ss_fp8_base"] == meta_p["ss_fp8_base"] == "False"

    # the nf4-trained LoRA loads on the bf16 base and changes its output as its own deltas say
    plain = bases["bf16"]
    loaded = load_adapter_file(q, plain, trainable=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    enc = plain.encode_prompts(["a red cube"])["prompt_embeds"].to(torch.bfloat16)
    with torch.no_grad():
        base_out = plain.unet(x, torch.tensor([300]), enc).sample.float()
        with attached(plain, loaded):
            lora_out = plain.unet(x, torch.tensor([300]), enc).sample.float()
    assert (lora_out - base_out).abs().max() > 1e-3
    entry = next(loaded.entries())
    layer = plain.unet.get_submodule(entry.name)
    with safe_open(str(q), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))
        assert f.get_tensor(key).abs().max() > 0  # trained, not the zero initialisation
    merged = entry.module.merged_weight(layer)
    assert merged.shape == layer.weight.shape


def test_fp8_denoiser_records_kohya_fp8_keys(bases, tmp_path):
    from app.ml.save import save_adapter

    bundle = load_model("builtin:tiny-sd", quant={"unet": "fp8"})
    path = save_adapter(_train_lora(bundle, steps=1), tmp_path / "fp8.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["nodetrainer_base_precision"]) == {"unet": "fp8", "text_encoder": "fp32"}
    assert (meta["ss_fp8_base"], meta["ss_fp8_base_unet"]) == ("True", "True")


@pytest.mark.parametrize("fmt", ["nf4", "fp8", "int8"])
def test_a_quantized_model_saves_and_loads_state_dicts_like_the_plain_one(fmt):
    """state_dict() gives the plain layer's keys and shapes (weights dequantized), so Save full_model, merges and
    hashes see a normal model; load_state_dict() quantizes given weights again in the layer's own format."""
    plain = load_model("builtin:tiny-sd")
    quant = load_model("builtin:tiny-sd", quant={"unet": fmt})
    sd_plain, sd_quant = plain.unet.state_dict(), quant.unet.state_dict()
    assert sd_quant.keys() == sd_plain.keys()
    assert all(sd_quant[k].shape == sd_plain[k].shape and sd_quant[k].dtype == sd_plain[k].dtype for k in sd_plain)
    name = next(n for n, m in quant.unet.named_modules() if isinstance(m, QuantizedLinear))
    layer = quant.unet.get_submodule(name)
    assert torch.equal(sd_quant[f"{name}.weight"], layer.dequantize())
    rel = (sd_quant[f"{name}.weight"] - sd_plain[f"{name}.weight"]).norm() / sd_plain[f"{name}.weight"].norm()
    assert 0 < rel < 0.15
    # loading other weights re-quantizes them: the layer now holds those weights, still packed
    other = {k: v * 2 if k == f"{name}.weight" else v for k, v in sd_plain.items()}
    quant.unet.load_state_dict(other)
    assert isinstance(quant.unet.get_submodule(name), QuantizedLinear) and layer.fmt == fmt
    reloaded = layer.dequantize().float()
    assert ((reloaded - other[f"{name}.weight"]).norm() / other[f"{name}.weight"].norm()) < 0.15
    with pytest.raises(RuntimeError, match="size mismatch"):
        quant.unet.load_state_dict({**other, f"{name}.weight": torch.zeros(3, 3)})
