"""The tiny Flux components: seeded, consistent with each other and with diffusers' FluxPipeline."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.ml.flux import latents as L
from app.ml.flux import tiny


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def flux(tok_cache):
    return tiny.build_tiny_flux(tokenizer_cache=tok_cache)


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builds_are_bit_identical_and_leave_the_rng_alone(flux):
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    again = {
        "transformer": tiny.build_transformer(),
        "vae": tiny.build_vae(),
        "text_encoder": tiny.build_clip(),
        "text_encoder_2": tiny.build_t5(),
    }
    assert torch.equal(torch.random.get_rng_state(), before)
    for name, module in again.items():
        assert _state_equal(module, flux[name]), name


_FINGERPRINT = """
import hashlib, sys
from app.ml.flux import tiny
for build in (tiny.build_transformer, tiny.build_vae, tiny.build_clip, tiny.build_t5):
    h = hashlib.sha256()
    for k, v in build().state_dict().items():
        h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
    print(h.hexdigest())
"""


def test_weights_are_the_same_in_another_process(flux):
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    out = subprocess.run([sys.executable, "-c", _FINGERPRINT], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    here = []
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        h = hashlib.sha256()
        for k, v in flux[name].state_dict().items():
            h.update(k.encode())
            h.update(v.contiguous().numpy().tobytes())
        here.append(h.hexdigest())
    assert out.stdout.split() == here


def test_configs_are_flux_shaped(flux):
    tcfg = flux["transformer"].config
    assert tcfg.in_channels == 64 == 4 * flux["vae"].config.latent_channels
    assert sum(tcfg.axes_dims_rope) == tcfg.attention_head_dim
    assert tcfg.guidance_embeds and hasattr(flux["transformer"].time_text_embed, "guidance_embedder")
    assert tcfg.joint_attention_dim == flux["text_encoder_2"].config.d_model
    assert tcfg.pooled_projection_dim == flux["text_encoder"].config.hidden_size
    assert 2 ** (len(flux["vae"].config.block_out_channels) - 1) == L.VAE_DOWNSCALE
    assert (flux["vae"].config.scaling_factor, flux["vae"].config.shift_factor) == (L.SCALING_FACTOR, L.SHIFT_FACTOR)
    assert not tiny.build_transformer(guidance=False).config.guidance_embeds


def test_t5_tokenizer_is_t5_like_and_reproducible(flux, tok_cache, tmp_path):
    from app.ml.flux.t5_tokenizer import tiny_t5_tokenizer_dir

    tok = flux["tokenizer_2"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red circle", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and 1 in ids and ids[-1] == 0 and max(ids) < flux["text_encoder_2"].config.vocab_size
    a = (tiny_t5_tokenizer_dir(tok_cache) / "spiece.model").read_bytes()
    b = (tiny_t5_tokenizer_dir(tmp_path) / "spiece.model").read_bytes()  # built afresh
    assert a == b
    assert tiny_t5_tokenizer_dir(tok_cache) == tiny_t5_tokenizer_dir(tok_cache)  # reused, not rebuilt


def test_transformer_forward_on_packed_latents(flux):
    g = torch.Generator().manual_seed(0)
    vae_latent = torch.randn(2, 16, 6, 4, generator=g)
    x = L.pack(L.encode_scale(vae_latent))
    ctx = torch.randn(2, 10, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        out = flux["transformer"](
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
            timestep=torch.tensor([0.25, 0.75]), guidance=torch.tensor([1.0, 1.0]),
            img_ids=L.image_ids(6, 4), txt_ids=L.text_ids(10), return_dict=False,
        )[0]
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert L.unpack(out, 6, 4).shape == vae_latent.shape


def test_flux_pipeline_runs_two_steps_at_32px(flux):
    pipe = tiny.tiny_flux_pipeline(flux)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=tiny.T5_MAX_LENGTH, output_type="pt")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_unwritable_tokenizer_cache_is_a_clear_error(tmp_path, monkeypatch):
    from app.ml.flux.t5_tokenizer import TokenizerBuildError, cache_root, tiny_t5_tokenizer_dir

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NODETRAINER_CACHE", str(blocker / "cache"))
    assert cache_root() == blocker / "cache"
    with pytest.raises(TokenizerBuildError, match=r"builtin:tiny-flux: cannot write its T5 tokenizer into .*NODETRAINER_CACHE"):
        tiny_t5_tokenizer_dir()
    assert blocker.read_text().startswith("a file")  # nothing of the user's is touched
