"""A LoRA we save loads into a diffusers pipeline with every key used, and samples like ours.

The pipeline is built from a second, identical copy of the tiny model (``load_lora_weights``
injects PEFT layers into the modules it is given; our bundle must stay clean).
"""
from __future__ import annotations

import logging

import pytest
import torch

from app.ml.adapters import AdapterConfig, create_adapter_set
from app.ml.models import load_model
from app.ml.sampling import build_pipeline, make_scheduler, sample_images
from app.ml.save import save_adapter

STEPS, SIZE, SEED, STRENGTH = 3, 64, 11, 0.8


def _random_set(bundle, algorithm):
    tes = {spec.name: "attn-mlp" for spec in bundle.family.text_encoders}
    aset = create_adapter_set(bundle, AdapterConfig(algorithm=algorithm, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0,
                                                    targets={"unet": "full", **tes}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return aset


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name,layout", [("tiny-sd", "kohya"), ("tiny-sd", "peft"), ("tiny-sdxl", "kohya"), ("tiny-sdxl", "peft")])
def test_diffusers_loads_every_key_and_matches_our_sampler(tmp_path, name, layout):
    from peft.tuners.lora import LoraLayer

    ours = load_model("builtin:" + name)
    aset = _random_set(ours, "locon")
    path = save_adapter(aset, tmp_path / "lora", layout=layout, dtype="fp32")
    with_lora = sample_images(ours, "a red cube", width=SIZE, height=SIZE, steps=STEPS, seed=SEED, sampler="Euler",
                              adapters=aset, strength=STRENGTH)
    without = sample_images(ours, "a red cube", width=SIZE, height=SIZE, steps=STEPS, seed=SEED, sampler="Euler")

    theirs = load_model("builtin:" + name)
    pipe = build_pipeline(theirs, make_scheduler("Euler", theirs.scheduler_config)[0])
    capture = _Capture()
    logger = logging.getLogger("diffusers")
    logger.addHandler(capture)
    try:
        pipe.load_lora_weights(str(path), adapter_name="ours")
    finally:
        logger.removeHandler(capture)
    complaints = [m for m in capture.messages if any(w in m.lower() for w in ("unexpected", "missing", "no lora keys", "not "))]
    assert not complaints, complaints
    pipe.set_adapters(["ours"], adapter_weights=[STRENGTH])

    injected = {}
    for comp in ["unet"] + [spec.name for spec in theirs.family.text_encoders]:
        mods = [n for n, m in getattr(pipe, comp).named_modules() if isinstance(m, LoraLayer)]
        injected[comp] = len(mods)
    assert injected == aset.summary()["layers"]

    latents = pipe(prompt="a red cube", negative_prompt="", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                   guidance_scale=7.0, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    torch.testing.assert_close(latents[0].float(), with_lora.latents[0], rtol=1e-4, atol=1e-4)
    assert (with_lora.latents[0] - without.latents[0]).abs().max() > 1e-2  # the LoRA matters
