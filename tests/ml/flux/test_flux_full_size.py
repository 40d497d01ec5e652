"""The shipped full-size Flux.1 configs, built on the meta device (no memory): the real shapes, the key
conversion at the real width against diffusers' unmodified converter, and the detector on real headers."""
from __future__ import annotations

import pytest
import torch

from app.ml.flux import detect as D
from app.ml.flux import keys as K
from app.ml.flux import variants as V


def _meta(variant, component):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = V.config(variant, component)
    with torch.device("meta"):
        if component == "transformer":
            return FluxTransformer2DModel.from_config(cfg)
        if component == "vae":
            return AutoencoderKL.from_config(cfg)
        if component == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**cfg))
        return T5EncoderModel(T5Config(**cfg))


@pytest.fixture(scope="module")
def dev():
    return _meta("dev", "transformer")


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _header(state):
    return {k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in state.items()}


def test_full_size_models_have_the_published_sizes(dev):
    assert round(_count(dev) / 1e9, 1) == 11.9  # Flux.1 dev: 12B
    assert round(_count(_meta("dev", "text_encoder_2")) / 1e9, 2) == 4.76  # T5-XXL encoder
    assert round(_count(_meta("dev", "text_encoder")) / 1e6) == 123  # CLIP-L text model
    assert round(_count(_meta("dev", "vae")) / 1e6, 1) == 83.8
    assert not V.config("schnell", "transformer")["guidance_embeds"] and V.config("dev", "transformer")["guidance_embeds"]
    assert V.config("schnell", "scheduler")["use_dynamic_shifting"] is False


def test_key_conversion_at_full_width_agrees_with_diffusers(dev):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = dev.state_dict()
    bfl = K.diffusers_to_bfl(sd)
    assert len(bfl) == 780
    assert tuple(bfl["single_blocks.37.linear1.weight"].shape) == (21504, 3072)
    assert tuple(bfl["double_blocks.18.img_attn.qkv.weight"].shape) == (9216, 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = K.bfl_to_diffusers(bfl)
    assert ours.keys() == theirs.keys() == sd.keys()
    assert all(ours[k].shape == theirs[k].shape == sd[k].shape for k in ours)


def test_detector_on_full_size_headers(dev):
    k = D.detect(_header(K.diffusers_to_bfl(dev.state_dict(), prefix="model.diffusion_model.")))
    assert (k.kind, k.variant, k.details["width"]) == ("flux-transformer", "dev", 3072)
    assert D.detect(_header(_meta("dev", "vae").state_dict())).details["latent_channels"] == 16
    t5 = D.detect(_header(_meta("dev", "text_encoder_2").state_dict()))
    assert (t5.kind, t5.details["d_model"], t5.details["blocks"]) == ("t5", 4096, 24)
    clip = D.detect(_header({"text_model." + k: v for k, v in _meta("dev", "text_encoder").state_dict().items()}))
    assert (clip.kind, clip.variant, clip.details["layers"]) == ("clip", "L", 12)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown Flux variant 'pro'"):
        V.config("pro", "vae")
    with pytest.raises(ValueError, match="unknown Flux component 'unet'"):
        V.config("dev", "unet")
