"""Flux sampling defaults and options: schnell (no guidance embedder) samples in 4 steps by default and is never
given a guidance value; true CFG uses the negative prompt through real classifier-free guidance (FluxPipeline's
``true_cfg_scale``), on tiny-flux."""

import dataclasses

import pytest
import torch

from app.ml.flux import tiny
from app.ml.models import load_model
from app.ml.models.families import FLUX_SCHNELL
from app.ml.sampling import sample_images

KW = dict(width=32, height=32, seed=7, sampler="euler")


@pytest.fixture(scope="module")
def dev():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def schnell(dev):
    return dataclasses.replace(dev, family=FLUX_SCHNELL, denoiser=tiny.build_transformer(guidance=False))


def _record_calls(model, calls):
    real = model.forward

    def forward(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    return forward


def test_schnell_defaults_to_4_steps_and_gets_no_guidance(schnell, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(schnell.denoiser, "forward", _record_calls(schnell.denoiser, calls))
    r = sample_images(schnell, ["a red circle"], steps=0, cfg=3.5, **KW)
    assert r.params[0]["steps"] == 4 and len(calls) == 4
    assert all(c.get("guidance") is None for c in calls)
    assert "cfg not used (the model has no guidance input)" in r.params[0]["sampler_impl"]


def test_dev_keeps_30_steps_and_its_distilled_guidance(dev, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(dev.denoiser, "forward", _record_calls(dev.denoiser, calls))
    r = sample_images(dev, ["a red circle"], steps=0, cfg=3.5, **KW)
    assert r.params[0]["steps"] == 30 and len(calls) == 30
    assert all(float(c["guidance"][0]) == 3.5 for c in calls)


def test_true_cfg_uses_the_negative_prompt_through_real_cfg(dev, monkeypatch):
    def latents(negative, **opts):
        return sample_images(dev, ["a red circle"], negative_prompt=negative, steps=3, cfg=3.5, **KW, **opts).latents[0]

    plain = latents("blue square")
    assert torch.equal(plain, latents("green"))  # off: the negative prompt is not used
    with_cfg = latents("blue square", options={"true_cfg": 4.0})
    assert not torch.allclose(with_cfg, plain, atol=1e-4)
    assert not torch.allclose(with_cfg, latents("green", options={"true_cfg": 4.0}), atol=1e-4)
    # pos + s·(pos − neg) with neg = pos is pos: real CFG against the prompt itself changes nothing
    assert torch.allclose(latents("a red circle", options={"true_cfg": 4.0}), plain, atol=1e-5)
    calls: list[dict] = []
    monkeypatch.setattr(dev.denoiser, "forward", _record_calls(dev.denoiser, calls))
    r = sample_images(dev, ["a red circle"], negative_prompt="blue", steps=3, cfg=3.5, options={"true_cfg": 4.0}, **KW)
    assert len(calls) == 6 and r.params[0]["true_cfg"] == 4.0  # two passes a step, recorded
    assert "true CFG 4 with the negative prompt" in r.params[0]["sampler_impl"]


def test_true_cfg_is_refused_by_name_for_sd():
    sd = load_model("builtin:tiny-sd")
    with pytest.raises(ValueError, match=r"Sample: true_cfg is not a sampling setting of Stable Diffusion 1.5 models.*cfg"):
        sample_images(sd, ["a"], steps=1, width=64, height=64, options={"true_cfg": 2.0})
