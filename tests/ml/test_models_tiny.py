"""Builtin tiny models and the ModelBundle methods on them."""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.ml.models.tiny import build_tiny_components, load_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]

CHECKSUM_CODE = """
import hashlib, os
os.environ['HF_HUB_OFFLINE'] = '1'
from app.ml.models import load_model
h = hashlib.sha256()
for name in ('builtin:tiny-sd', 'builtin:tiny-sdxl'):
    b = load_model(name)
    for m in (b.unet, b.vae, *b.text_encoders):
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode()); h.update(v.contiguous().view(-1).view(__import__('torch').uint8).numpy().tobytes())
    h.update(b.identity.encode())
print(h.hexdigest())
"""


def test_tiny_models_are_bit_identical_across_processes():
    procs = [
        subprocess.Popen([sys.executable, "-c", CHECKSUM_CODE], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)  # concurrently: half the wall time
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert outs[0][0].strip() == outs[1][0].strip()
    assert len(outs[0][0].strip()) == 64


def test_building_is_fast_small_and_leaves_global_rng_alone(sd):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    t = time.perf_counter()
    for name in ("tiny-sd", "tiny-sdxl"):
        comps = build_tiny_components(name)
        n = sum(p.numel() for m in (comps["unet"], comps["vae"], *comps["text_encoders"]) for p in m.parameters())
        assert 100_000 < n < 1_000_000, (name, n)
    assert time.perf_counter() - t < 2.0  # both, after the libraries are imported
    assert torch.equal(torch.rand(3), expected)


def test_tiny_models_use_the_real_module_names(sd, sdxl):
    unet_keys = set(sd.unet.state_dict())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in unet_keys
    assert "mid_block.attentions.0.proj_in.weight" in unet_keys
    assert type(sd.unet.down_blocks[0]).__name__ == "CrossAttnDownBlock2D"
    assert type(sd.unet.down_blocks[1]).__name__ == "DownBlock2D"
    xl_keys = set(sdxl.unet.state_dict())
    assert "add_embedding.linear_1.weight" in xl_keys
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight" in xl_keys  # 2 layers per block
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert "encoder.layers.0.self_attn.q_proj.weight" in sd.text_encoders[0].state_dict()
    assert type(sdxl.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    assert sd.vae_scale_factor == 8 == sd.family.vae_scale_factor


def test_tiny_tokenizer_knows_prompt_words():
    tok = load_tiny_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a red circle on a blue square").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 7  # every word is one token
    assert tok.convert_ids_to_tokens(ids[2]) == "red</w>"


@pytest.mark.parametrize("which, width, pooled", [("sd", 32, None), ("sdxl", 32 + 48, 48)])
def test_encode_shapes_per_family(which, width, pooled, request):
    b = request.getfixturevalue(which)
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    lat = b.encode_images(images)
    assert lat.shape == (2, 4, 8, 6) and lat.dtype == torch.float32
    assert torch.equal(lat, b.encode_images(images))  # mode, deterministic
    assert b.decode_latents(lat).shape == (2, 3, 64, 48)
    out = b.encode_prompts(["a red circle", "a blue square"])
    assert out["prompt_embeds"].shape == (2, 77, width)
    assert width == b.unet.config.cross_attention_dim
    if pooled:
        assert out["pooled_prompt_embeds"].shape == (2, pooled)
    else:
        assert "pooled_prompt_embeds" not in out
    assert not torch.allclose(out["prompt_embeds"][0], out["prompt_embeds"][1])


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_long_prompts_encode_in_75_token_pieces(which, request):
    b = request.getfixturevalue(which)
    long = "a red circle, " + ", ".join(f"detail {i}" for i in range(25))
    assert 75 < b.token_counts([long])[0] <= 150
    one, two = b.encode_prompts(["a red circle", long]), b.encode_prompts(["a red circle", long], chunks=2)
    assert two["prompt_embeds"].shape[1] == 2 * 77
    # a short prompt's first piece is its usual encoding; the long one's first piece is its cut version
    torch.testing.assert_close(two["prompt_embeds"][:, :77], one["prompt_embeds"])
    if "pooled_prompt_embeds" in one:
        torch.testing.assert_close(two["pooled_prompt_embeds"], one["pooled_prompt_embeds"])
    # the second piece of the long prompt carries its tail; the short prompt's is an empty piece
    empty = b.encode_prompts([""])["prompt_embeds"][0]
    torch.testing.assert_close(two["prompt_embeds"][0, 77:], empty)
    assert not torch.allclose(two["prompt_embeds"][1, 77:], empty)
    ids = b.tokenize([long], chunks=2)[0][0]
    tok = b.tokenizers[0]
    assert ids[1, 0] == tok.bos_token_id and tok.eos_token_id in ids[1].tolist()


def test_sdxl_conditioning_runs_through_the_unet(sdxl):
    lat = sdxl.encode_images(torch.zeros(2, 3, 64, 64))
    emb = sdxl.encode_prompts(["red", "blue"])
    time_ids = sdxl.add_time_ids([(64, 64), (128, 96)], crop_top_left=(0, 8), target_size=(64, 64))
    assert time_ids.tolist() == [[64, 64, 0, 8, 64, 64], [128, 96, 0, 8, 64, 64]]
    cond = {"text_embeds": emb["pooled_prompt_embeds"], "time_ids": time_ids}
    with torch.no_grad():
        pred = sdxl.unet(lat, torch.tensor([1, 500]), emb["prompt_embeds"], added_cond_kwargs=cond).sample
    assert pred.shape == lat.shape
    assert sdxl.add_time_ids((64, 64), batch_size=3).shape == (3, 6)


def test_time_ids_only_for_sdxl(sd):
    with pytest.raises(ValueError, match="time ids"):
        sd.add_time_ids((512, 512))


def test_clip_skip_selects_an_earlier_layer(sd):
    a = sd.encode_prompts(["a red circle"])["prompt_embeds"]
    b = sd.encode_prompts(["a red circle"], clip_skip=2)["prompt_embeds"]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_bundle_is_immutable_and_methods_do_not_touch_weights(sd):
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    vae_before = {k: v.clone() for k, v in sd.vae.state_dict().items()}
    sd.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1, sample=True, generator=torch.Generator().manual_seed(0))
    sd.encode_prompts(["x"])
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    assert all(torch.equal(v, vae_before[k]) for k, v in sd.vae.state_dict().items())
    assert not any(p.requires_grad for m in (sd.unet, sd.vae, *sd.text_encoders) for p in m.parameters())
    with pytest.raises(dataclasses.FrozenInstanceError):
        sd.unet = None
    with pytest.raises(TypeError):
        sd.identities["vae"] = "other"
    with pytest.raises(TypeError):
        sd.scheduler_config["prediction_type"] = "v_prediction"


def test_encode_images_rejects_wrong_ranges_and_sizes(sd):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        sd.encode_images(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="multiple"):
        sd.encode_images(torch.zeros(1, 3, 30, 32))
    with pytest.raises(TypeError):
        sd.encode_prompts("a single string")


def test_identities_and_scheduler(sd, sdxl):
    assert set(sd.identities) == {"unet", "vae", "text_encoder", "tokenizer"}
    assert sd.vae_identity != sdxl.vae_identity
    assert sd.identity != sdxl.identity
    assert sd.prediction_type == "epsilon"
    sched = sd.make_noise_scheduler()
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
