"""A Flux dev LoRA on schnell (and the reverse) loads with a warning naming both variants, as kohya and ComfyUI
apply them; a dev LoRA's guidance-embedder modules are skipped on schnell and named; SD and Flux LoRAs are
still refused on each other's models."""

import dataclasses

import pytest
import torch

from app.ml.adapters import AdapterConfig, attached, create_adapter_set
from app.ml.flux import tiny
from app.ml.flux.variants import lora_variant
from app.ml.models import load_model
from app.ml.models.families import FLUX_SCHNELL
from app.ml.save import save_adapter
from nodes.lora_tools import load_lora


class Ctx:
    def __init__(self):
        self.warnings, self.logs = [], []

    def warn(self, message):
        self.warnings.append(message)

    def log(self, message):
        self.logs.append(message)

    def preview(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def dev():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def schnell(dev):
    torch.manual_seed(3)
    return dataclasses.replace(dev, family=FLUX_SCHNELL, denoiser=tiny.build_transformer(guidance=False))


def _lora(bundle, preset, seed=0):
    aset = create_adapter_set(bundle, AdapterConfig(rank=4, alpha=4.0, seed=seed, targets={"unet": preset}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return aset


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "peft"])
def test_dev_lora_with_the_guidance_embedder_loads_on_schnell_without_it(dev, schnell, layout, tmp_path):
    aset = _lora(dev, "full")
    guidance = [e.name for e in aset.entries() if "guidance_embedder" in e.name]
    assert len(guidance) == 2
    path = save_adapter(aset, tmp_path / f"dev_{layout}.safetensors", layout=layout, dtype="fp32")
    ctx = Ctx()
    lora = load_lora(ctx, schnell, str(path))
    names = {e.name for e in lora.adapters.entries()}
    assert names == {e.name for e in aset.entries()} - set(guidance)
    assert lora.adapters.family is FLUX_SCHNELL
    both = [w for w in ctx.warnings if "Flux.1 dev" in w and "Flux.1 schnell" in w and path.name in w]
    assert both, ctx.warnings
    skipped = [w for w in ctx.warnings if "skipped 2 module(s) of dev's guidance embedder" in w]
    assert skipped and ("guidance_in" in skipped[0] or "guidance_embedder" in skipped[0]), ctx.warnings
    # every block module applies on schnell with the weights it had on dev
    by_name = {e.name: e.module for e in aset.entries()}
    for e in lora.adapters.entries():
        assert torch.allclose(e.module.delta_weight(), by_name[e.name].delta_weight(), atol=1e-6), e.name
    x = torch.randn(1, 16, 4, 4)
    cond = schnell.family.conditioning(schnell, schnell.family.encode_prompts(schnell, ["a"]), pixel_size=(32, 32),
                                       batch=1, device="cpu")
    with torch.no_grad(), attached(schnell, lora.adapters):
        out = schnell.family.predict(schnell.denoiser, x, torch.tensor([0.5]), cond)
    plain = schnell.family.predict(schnell.denoiser, x, torch.tensor([0.5]), cond).detach()
    assert not torch.allclose(out, plain)


def test_dev_block_lora_on_schnell_and_schnell_lora_on_dev_warn_naming_both(dev, schnell, tmp_path):
    path = save_adapter(_lora(dev, "attn-mlp"), tmp_path / "dev_blocks.safetensors", layout="kohya", dtype="fp32")
    ctx = Ctx()
    lora = load_lora(ctx, schnell, str(path))
    assert len(lora.adapters) == len(_lora(dev, "attn-mlp"))
    assert len(ctx.warnings) == 1 and "trained on Flux.1 dev; the model is Flux.1 schnell" in ctx.warnings[0]
    back = save_adapter(_lora(schnell, "attn-mlp", seed=4), tmp_path / "schnell.safetensors", layout="comfyui",
                        dtype="fp32")
    ctx = Ctx()
    load_lora(ctx, dev, str(back))
    assert len(ctx.warnings) == 1 and "trained on Flux.1 schnell; the model is Flux.1 dev" in ctx.warnings[0]
    same = Ctx()
    load_lora(same, dev, str(path))
    assert same.warnings == []


def test_variant_of_a_foreign_file_from_modelspec_or_its_guidance_keys():
    assert lora_variant({"modelspec.architecture": "flux-1-schnell/lora", "ss_base_model_version": "flux1"}, []) == "schnell"
    assert lora_variant({"modelspec.architecture": "flux-1-dev/lora"}, []) == "dev"
    assert lora_variant({"ss_base_model_version": "flux1"}, ["lora_unet_guidance_in_in_layer.lora_down.weight"]) == "dev"
    assert lora_variant({"ss_base_model_version": "flux1"}, ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == ""


def test_sd_and_flux_loras_are_still_refused_on_each_other(dev, tmp_path):
    from app.engine.errors import NodeError

    sd = load_model("builtin:tiny-sd")
    sd_file = save_adapter(_lora(sd, "attn-only"), tmp_path / "sd.safetensors", layout="kohya", dtype="fp32")
    flux_file = save_adapter(_lora(dev, "attn-mlp"), tmp_path / "flux.safetensors", layout="kohya", dtype="fp32")
    with pytest.raises(NodeError, match="this is an SD 1.5 LoRA; the model is Flux"):
        load_lora(Ctx(), dev, str(sd_file))
    with pytest.raises(NodeError, match="this is a Flux LoRA; the model is SD 1.5"):
        load_lora(Ctx(), sd, str(flux_file))
