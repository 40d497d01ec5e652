"""Our embedding files load in diffusers' ``load_textual_inversion`` and its pipeline samples the image
our Sample does (same seed, sampler, steps), as the LoRA interop test checks for LoRAs.

The pipeline is built from a second, identical copy of the tiny model: ``load_textual_inversion``
adds tokens to the tokenizer and resizes the text encoder's table, which our bundle must never see.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from app.ml.embeddings import create_embedding, save_embedding
from app.ml.models import load_model
from app.ml.sampling import build_pipeline, make_scheduler, sample_images

STEPS, SIZE, SEED = 3, 64, 7
PROMPT = "a <ohwx> shape"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_diffusers_loads_our_embedding_and_samples_like_us(tmp_path, name):
    ours = load_model("builtin:" + name)
    emb = create_embedding(ours, "<ohwx>", 3, "red")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in emb.vectors.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)  # trained-looking: not just the words' vectors
    path = save_embedding(emb, tmp_path / "ohwx", dtype="fp32")
    with_emb = sample_images(ours, PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, sampler="Euler",
                             adapters=[emb])
    without = sample_images(ours, PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, sampler="Euler")

    theirs = load_model("builtin:" + name)
    pipe = build_pipeline(theirs, make_scheduler("Euler", theirs.scheduler_config)[0])
    if name == "tiny-sd":
        pipe.load_textual_inversion(str(path), token="<ohwx>")  # by path: emb_params is its one-key layout
    else:
        with pytest.raises(ValueError):  # two keys (clip_l, clip_g) are none of diffusers' by-path layouts
            pipe.load_textual_inversion(str(path), token="<ohwx>")
        sd = load_file(str(path))
        pipe.load_textual_inversion(sd["clip_l"], token="<ohwx>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token="<ohwx>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    latents = pipe(prompt=PROMPT, negative_prompt="", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                   guidance_scale=7.0, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    torch.testing.assert_close(latents[0].float(), with_emb.latents[0], rtol=1e-4, atol=1e-4)
    assert (with_emb.latents[0] - without.latents[0]).abs().max() > 1e-2  # the embedding matters
    # and our bundle never saw diffusers' added tokens
    assert all(len(t) == len(pipe_t) - 3 for t, pipe_t in zip(ours.tokenizers, [pipe.tokenizer] +
                                                               ([pipe.tokenizer_2] if name == "tiny-sdxl" else [])))
