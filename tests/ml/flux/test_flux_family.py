"""The Flux family through the model layer: builtin:tiny-flux loading, prompt encoding, the denoiser call,
LoRA presets, LoRA files in every layout (saved, read back, loaded by diffusers), refusals by name."""

import copy

import pytest
import torch

from app.ml.adapters import AdapterConfig, AdapterError, attached, create_adapter_set, load_adapter_file
from app.ml.models import load_model
from app.ml.models.families import FLUX_DEV, get_family
from app.ml.sampling import sample_images
from app.ml.save import save_adapter


@pytest.fixture(scope="module")
def flux():
    return load_model("builtin:tiny-flux")


def _lora(bundle, preset="attn-mlp", seed=3):
    """A LoRA whose ups are non-zero (a fresh LoRA changes nothing, which would prove nothing)."""
    aset = create_adapter_set(bundle, AdapterConfig(algorithm="lora", rank=4, alpha=2.0, targets={"unet": preset}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in aset.entries():
            e.module.lora_up.weight.copy_(torch.randn(e.module.lora_up.weight.shape, generator=g) * 0.05)
    return aset


def test_tiny_flux_loads_as_flux_dev(flux):
    assert flux.family is FLUX_DEV and flux.family.denoiser == "transformer" and flux.family.objective == "flow"
    assert type(flux.denoiser).__name__ == "FluxTransformer2DModel" and flux.unet is flux.denoiser
    assert flux.denoiser.config.guidance_embeds
    assert set(flux.dtypes) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert get_family("flux") is FLUX_DEV and get_family("flux-schnell").guidance_embeds is False


def test_prompts_are_t5_hidden_states_and_clip_pooled(flux):
    out = flux.encode_prompts(["a red circle", "blue"])
    assert out["prompt_embeds"].shape == (2, 32, 32) and out["pooled_prompt_embeds"].shape == (2, 32)
    # FluxPipeline's own encoding gives the same tensors
    pipe = flux.family.build_pipeline(flux)
    embeds, pooled, _ = pipe.encode_prompt(["a red circle", "blue"], prompt_2=None, max_sequence_length=32)
    assert torch.equal(embeds.float(), out["prompt_embeds"]) and torch.equal(pooled.float(), out["pooled_prompt_embeds"])


def test_text_length_is_a_load_setting_and_part_of_the_text_identity(flux):
    assert flux.tokenizers[1].model_max_length == 32  # the tiny model's default
    longer = load_model("builtin:tiny-flux", text_max_length=48)
    assert longer.encode_prompts(["red"])["prompt_embeds"].shape == (1, 48, 32)
    assert longer.text_identity != flux.text_identity and longer.vae_identity == flux.vae_identity
    assert load_model("builtin:tiny-flux", text_max_length=32).text_identity == flux.text_identity
    from app.ml.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="text_max_length 600"):
        load_model("builtin:tiny-flux", text_max_length=600)


def test_lora_presets_select_the_transformer_linears(flux):
    names = {p: [e.name for e in create_adapter_set(flux, AdapterConfig(targets={"unet": p})).entries()]
             for p in ("attn-only", "attn-mlp", "single-blocks", "full")}
    assert "transformer_blocks.0.attn.to_q" in names["attn-only"] and "transformer_blocks.0.attn.add_k_proj" in names["attn-only"]
    assert not any("ff." in n or "proj_mlp" in n for n in names["attn-only"])
    assert "transformer_blocks.1.ff_context.net.2" in names["attn-mlp"] and "single_transformer_blocks.0.proj_mlp" in names["attn-mlp"]
    assert names["single-blocks"] and all(n.startswith("single_transformer_blocks.") for n in names["single-blocks"])
    assert set(names["attn-mlp"]) < set(names["full"]) and "x_embedder" in names["full"]
    sd = load_model("builtin:tiny-sd")
    with pytest.raises(AdapterError, match="single-blocks"):
        create_adapter_set(sd, AdapterConfig(targets={"unet": "single-blocks"}))


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "peft"])
def test_flux_lora_round_trips_in_every_layout(flux, tmp_path, layout):
    aset = _lora(flux, "full")
    path = save_adapter(aset, tmp_path / f"l_{layout}.safetensors", layout=layout, dtype="fp32")
    back = load_adapter_file(path, flux)
    ours = {e.name: e.module.delta_weight() for e in aset.entries()}
    theirs = {e.name: e.module.delta_weight() for e in back.entries()}
    assert set(theirs) == set(ours)
    for name, delta in ours.items():
        assert torch.allclose(theirs[name], delta, atol=1e-6), name


def test_kohya_file_has_fused_bfl_names_and_flux_metadata(flux, tmp_path):
    from safetensors import safe_open

    path = save_adapter(_lora(flux), tmp_path / "k.safetensors", layout="kohya", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert not any("to_q" in k for k in keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux" and "modelspec.prediction_type" not in meta


def test_a_lora_for_the_other_architecture_is_refused_by_name(flux, tmp_path):
    sd = load_model("builtin:tiny-sd")
    flux_file = save_adapter(_lora(flux), tmp_path / "flux.safetensors", layout="kohya")
    with pytest.raises(AdapterError, match="flux.safetensors: this is a LoRA for Flux.1, not for Stable Diffusion 1.5"):
        load_adapter_file(flux_file, sd)
    sd_file = save_adapter(create_adapter_set(sd, AdapterConfig()), tmp_path / "sd.safetensors", layout="kohya")
    with pytest.raises(AdapterError, match="sd.safetensors: this is a LoRA for Stable Diffusion"):
        load_adapter_file(sd_file, flux)


def test_sample_size_must_be_a_multiple_of_16(flux):
    with pytest.raises(ValueError, match="multiples of 16 for Flux.1 dev"):
        sample_images(flux, ["red"], width=40, height=32, steps=1, seed=0)


def test_diffusers_loads_our_peft_lora_and_samples_the_same_image(flux, tmp_path):
    """Our PEFT-layout file in FluxPipeline.load_lora_weights: every module matched, and the image it samples
    equals our Sample path's with the adapter attached."""
    from diffusers import FluxPipeline

    aset = _lora(flux, "attn-mlp")
    path = save_adapter(aset, tmp_path / "peft.safetensors", layout="peft", dtype="fp32")
    ours = sample_images(flux, ["a red circle"], width=32, height=32, steps=3, cfg=3.5, seed=7, sampler="euler",
                         adapters=aset)
    plain = sample_images(flux, ["a red circle"], width=32, height=32, steps=3, cfg=3.5, seed=7, sampler="euler")
    assert not torch.allclose(ours.latents[0], plain.latents[0], atol=1e-4)  # the LoRA changes the image

    pipe = FluxPipeline(scheduler=flux.family.build_pipeline(flux).scheduler, vae=flux.vae,
                        text_encoder=flux.text_encoders[0], tokenizer=flux.tokenizers[0],
                        text_encoder_2=flux.text_encoders[1], tokenizer_2=flux.tokenizers[1],
                        transformer=copy.deepcopy(flux.denoiser))
    pipe.load_lora_weights(str(path), adapter_name="ours")
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert loaded == {e.name for e in aset.entries()}  # no missing and no unused module
    out = pipe("a red circle", width=32, height=32, num_inference_steps=3, guidance_scale=3.5,
               generator=torch.Generator("cpu").manual_seed(7), output_type="latent", max_sequence_length=32).images
    from app.ml.flux.latents import unpack

    assert torch.allclose(unpack(out, 4, 4)[0].float(), ours.latents[0], atol=1e-5)


def test_predict_packs_and_unpacks_around_the_transformer(flux):
    b, h, w = 2, 4, 6
    noisy = torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(0))
    text = flux.encode_prompts(["a", "b"])
    cond = flux.family.conditioning(flux, text, pixel_size=(h * 8, w * 8), batch=b, device="cpu", guidance=1.0)
    with torch.no_grad():
        out = flux.family.predict(flux.denoiser, noisy, torch.tensor([0.3, 0.7]), cond)
    assert out.shape == noisy.shape
    with torch.no_grad(), attached(flux, _lora(flux)):
        changed = flux.family.predict(flux.denoiser, noisy, torch.tensor([0.3, 0.7]), cond)
    assert not torch.allclose(changed, out)
