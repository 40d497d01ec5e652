"""Sampling: every sampler deterministic per seed on CPU, seeds recorded, PNGs carry recipe + parameters."""
from __future__ import annotations

import json

import pytest
import torch

from app.ml.adapters import AdapterConfig, create_adapter_set
from app.ml.sampling import SAMPLERS, make_scheduler, read_png_text, sample_images, save_samples


def _run(bundle, **kw):
    args = dict(width=64, height=64, steps=3, seed=7, sampler="Euler a")
    args.update(kw)
    return sample_images(bundle, ["a red cube"], **args)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_is_deterministic_per_seed(sd, sampler):
    a, b, c = _run(sd, sampler=sampler), _run(sd, sampler=sampler), _run(sd, sampler=sampler, seed=8)
    assert torch.equal(a.latents[0], b.latents[0])
    assert list(a.images[0].getdata()) == list(b.images[0].getdata())
    assert not torch.equal(a.latents[0], c.latents[0])
    assert a.images[0].size == (64, 64) and a.params[0]["sampler"] == sampler


def test_scheduler_flags():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    s, _ = make_scheduler("DPM++ 2M Karras", cfg)
    assert type(s).__name__ == "DPMSolverMultistepScheduler" and s.config.use_karras_sigmas and s.config.algorithm_type == "dpmsolver++"
    s, _ = make_scheduler("DPM++ 2M", cfg)
    assert not s.config.use_karras_sigmas
    assert type(make_scheduler("Euler a", cfg)[0]).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(make_scheduler("UniPC", cfg)[0]).__name__ == "UniPCMultistepScheduler"
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("Heun++", cfg)


def test_random_seed_is_recorded_and_reproduces(sd):
    r = _run(sd, seed=None, images_per_prompt=2)
    seeds = [p["seed"] for p in r.params]
    assert seeds[1] == seeds[0] + 1
    again = _run(sd, seed=seeds[1])
    assert torch.equal(again.latents[0], r.latents[1])  # an image is reproducible from its own seed


def test_adapter_strength(sd):
    aset = create_adapter_set(sd, AdapterConfig(rank=4, alpha=4, targets={"unet": "attn-mlp"}))
    with torch.no_grad():
        for p in aset.parameters():
            p.normal_(0, 0.1)
    base = _run(sd)
    assert torch.equal(_run(sd, adapters=aset, strength=0.0).latents[0], base.latents[0])
    assert not torch.equal(_run(sd, adapters=aset, strength=1.0).latents[0], base.latents[0])


def test_png_has_recipe_and_parameters(sd, tmp_path):
    r = _run(sd, negative_prompt="blurry")
    recipe = {"format_version": 1, "nodes": {"1": {"type": "Sample"}}}
    paths = save_samples(r, tmp_path, recipe=recipe)
    again = save_samples(r, tmp_path, recipe=recipe)
    assert paths[0] != again[0] and again[0].stem.endswith("_1")
    text = read_png_text(paths[0])
    assert json.loads(text["nodetrainer_recipe"]) == recipe
    params = json.loads(text["nodetrainer_params"])
    assert params["seed"] == 7 and params["sampler"] == "Euler a" and params["negative_prompt"] == "blurry"
    assert text["parameters"].startswith("a red cube\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7.0, Seed: 7")


def test_bad_size_is_refused(sd):
    with pytest.raises(ValueError, match="multiples of 8"):
        _run(sd, width=60)


LONG = "a red cube, " + ", ".join(f"detail {i}" for i in range(40))  # well past 75 tokens


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_our_prompt_embeddings_sample_exactly_like_the_pipelines_own(model, monkeypatch):
    """The long-prompt path hands the pipeline our embeddings; with one piece they must be what
    the pipeline makes of the text itself, with and without a negative prompt."""
    from app.ml.models import load_model
    from app.ml.sampling import generate

    bundle = load_model(model)
    text = _run(bundle, negative_prompt="").latents[0]
    with_negative = _run(bundle, negative_prompt="blurry").latents[0]
    original = generate._long_prompt_embeds
    monkeypatch.setattr(generate, "_long_prompt_embeds", lambda *a: original(*a, chunks=1))
    torch.testing.assert_close(_run(bundle, negative_prompt="").latents[0], text)
    torch.testing.assert_close(_run(bundle, negative_prompt="blurry").latents[0], with_negative)


def test_long_prompts_are_read_past_75_tokens(sd):
    assert sd.token_counts([LONG])[0] > 75
    cut = sd.tokenizers[0].decode(sd.tokenize([LONG])[0][0, 1:76])  # what one 77-token window keeps
    full = sample_images(sd, [LONG], width=64, height=64, steps=3, seed=7, sampler="euler").latents[0]
    truncated = sample_images(sd, [cut], width=64, height=64, steps=3, seed=7, sampler="euler").latents[0]
    assert not torch.allclose(full, truncated)  # the words after token 75 change the image
    again = sample_images(sd, [LONG], width=64, height=64, steps=3, seed=7, sampler="euler").latents[0]
    torch.testing.assert_close(full, again)


@pytest.mark.parametrize("source", ["builtin:tiny-sd", "builtin:tiny-sdxl", "builtin:tiny-flux"])
def test_a_bf16_denoiser_beside_fp32_text_encoders_samples(source):
    """LoadModel's dtypes are per component: a bf16 UNet/transformer with fp32 text encoders must sample
    (the pipelines made its inputs in the encoders' dtype: 'mat1 and mat2 must have the same dtype')."""
    from app.ml.models import load_model

    mixed = load_model(source, dtypes={"unet": "bf16", "text_encoder": "fp32", "vae": "fp32"})
    plain = load_model(source)
    kw = dict(width=64, height=64, steps=3, seed=5, sampler="euler")
    a = sample_images(mixed, ["a red circle"], **kw).latents[0].float()
    b = sample_images(plain, ["a red circle"], **kw).latents[0].float()
    assert torch.isfinite(a).all()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.95, cos  # the same image, within bf16 rounding
