"""Full-model saves: single original-layout file and diffusers folder load back equal (merged adapters too)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from app.ml.adapters import AdapterConfig, attached, create_adapter_set
from app.ml.models import load_model
from app.ml.save import save_diffusers, save_single_file


def _unet_out(bundle):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = bundle.encode_prompts(["a red cube"])
        kw = {}
        if bundle.family.uses_time_ids:
            kw["added_cond_kwargs"] = {"text_embeds": emb["pooled_prompt_embeds"], "time_ids": bundle.add_time_ids((64, 64))}
        return bundle.unet(x, torch.tensor([300]), emb["prompt_embeds"], **kw).sample


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_single_file_and_diffusers_folder_round_trip_with_merged_adapter(tmp_path, name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    bundle = load_model("builtin:" + name)
    tes = {spec.name: "attn-mlp" for spec in bundle.family.text_encoders}
    aset = create_adapter_set(bundle, AdapterConfig(algorithm="dora", rank=2, alpha=2.0, targets={"unet": "full", **tes}))
    with torch.no_grad():
        for n, p in aset.named_parameters():
            if "dora_scale" not in n:
                p.normal_(0, 0.05)
    with attached(bundle, aset, 0.7):
        want = _unet_out(bundle)
    base_before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}

    folder = save_diffusers(bundle, tmp_path / "model", adapters=aset, strength=0.7, recipe={"r": 1})
    single = save_single_file(bundle, tmp_path / "model.safetensors", adapters=aset, strength=0.7, recipe={"r": 1}, step=5)
    assert all(torch.equal(v, base_before[k]) for k, v in bundle.unet.state_dict().items())  # merge made copies

    with safe_open(str(single), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert meta["nodetrainer_recipe"] == '{"r":1}' and meta["nodetrainer_step"] == "5"

    from_folder = load_model(str(folder))
    from_file = load_model(str(single), config=str(folder))
    for loaded in (from_folder, from_file):
        torch.testing.assert_close(_unet_out(loaded), want, rtol=1e-4, atol=1e-5)
        for a, b in zip(loaded.text_encoders, bundle.text_encoders):
            assert a.state_dict().keys() == b.state_dict().keys()

    cls = StableDiffusionXLPipeline if name == "tiny-sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    theirs, ours = pipe.unet.state_dict(), from_file.unet.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert torch.equal(pipe.vae.state_dict()["decoder.conv_out.weight"], bundle.vae.state_dict()["decoder.conv_out.weight"])


def test_full_saves_do_not_overwrite(tmp_path):
    bundle = load_model("builtin:tiny-sd")
    a = save_single_file(bundle, tmp_path / "m.safetensors", dtype="fp16")
    b = save_single_file(bundle, tmp_path / "m.safetensors")
    assert (a.name, b.name) == ("m.safetensors", "m_1.safetensors")
    with safe_open(str(a), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    f1 = save_diffusers(bundle, tmp_path / "d")
    f2 = save_diffusers(bundle, tmp_path / "d")
    assert (f1.name, f2.name) == ("d", "d_1") and (f2 / "model_index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
