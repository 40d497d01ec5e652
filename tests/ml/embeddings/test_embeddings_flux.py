"""Flux embeddings cover CLIP-L and T5: the placeholder reads as its vectors in both encoders (the
T5 prompt embeddings and CLIP's pooled output), in sampling too, and the file has OneTrainer's keys."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from app.ml.adapters import attached
from app.ml.embeddings import create_embedding, load_embedding_file, save_embedding
from app.ml.sampling import sample_images
from embedding_helpers import tokenizes_like_a_word


@pytest.fixture(scope="module")
def flux():
    from app.ml.models import load_model

    return load_model("builtin:tiny-flux")


def test_placeholder_reads_as_its_vectors_in_clip_and_t5(flux):
    # "blue circle" is two tokens for both tiny tokenizers: the placeholder must encode exactly as those words
    emb = create_embedding(flux, "<ohwx>", 2, "blue circle")
    assert sorted(emb.vectors) == ["text_encoder", "text_encoder_2"]
    want = flux.encode_prompts(["a blue circle shape"])
    plain = flux.encode_prompts(["a <ohwx> shape"])
    t5 = flux.tokenizers[1]
    with attached(flux, emb):
        got = flux.encode_prompts(["a <ohwx> shape"])
        assert t5("a <ohwx> shape").input_ids[:4] == [*t5("a", add_special_tokens=False).input_ids, len(t5),
                                                      len(t5) + 1, *t5("shape", add_special_tokens=False).input_ids]
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        assert (plain[key] - want[key]).abs().max() > 1e-3
    kw = dict(width=32, height=32, steps=2, seed=3)
    ours = sample_images(flux, "a <ohwx> shape", adapters=[emb], **kw)
    words = sample_images(flux, "a blue circle shape", **kw)
    torch.testing.assert_close(ours.latents[0], words.latents[0], rtol=0, atol=1e-5)


def test_flux_file_has_clip_l_and_t5(tmp_path, flux):
    emb = create_embedding(flux, "<ohwx>", 3, "green")
    path = save_embedding(emb, tmp_path / "flux_emb", dtype="fp32")
    with safe_open(str(path), framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {"clip_l": (3, 32), "t5": (3, 32)}
    back = load_embedding_file(path, flux)
    for c in emb.components:
        assert torch.equal(back.vectors[c], emb.vectors[c])
    clip_only = create_embedding(flux, "<c>", 1, "green", encoders=["clip_l"])
    assert clip_only.components == ["text_encoder"]
    with attached(flux, clip_only):  # T5 reads "<c>" as plain text: only CLIP is patched
        assert max(flux.tokenizers[1]("<c>").input_ids) < len(flux.tokenizers[1])
        assert flux.tokenizers[0]("<c>").input_ids[1] == len(flux.tokenizers[0])


def test_t5_tokenizer_options_behave_as_without_the_patch(flux):
    tokenizes_like_a_word(flux, create_embedding(flux, "<ohwx>", 1), "blue")
