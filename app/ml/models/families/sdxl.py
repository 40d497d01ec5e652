"""Stable Diffusion XL: the SD UNet family with two CLIP encoders (penultimate layers, OpenCLIP-bigG's
pooled output) and size/crop micro-conditioning (``time_ids``), sampled through
``StableDiffusionXLPipeline``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .base import TextEncoderSpec
from .memory import ActivationProfile
from .sd import SDFamily


@dataclass(frozen=True)
class SDXLFamily(SDFamily):
    def conditioning(self, bundle, text: Mapping[str, Any], *, pixel_size: tuple[int, int], batch: int,
                     device, original_sizes=None, crops_top_left=None, guidance: float | None = None) -> dict[str, Any]:
        h, w = pixel_size
        time_ids = bundle.add_time_ids(original_sizes or [(h, w)] * batch, crops_top_left or [(0, 0)] * batch,
                                       [(h, w)] * batch)
        return {"encoder_hidden_states": text["prompt_embeds"],
                "added_cond_kwargs": {"text_embeds": text["pooled_prompt_embeds"], "time_ids": time_ids.to(device)}}

    def model_index_extras(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": True}

    def build_pipeline(self, bundle, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )


SDXL_TE1 = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="CLIP ViT-L/14",
    model_class="CLIPTextModel",
    hidden_size=768,
    hidden_layer=-2,
    final_layer_norm=False,
    kohya_prefix="lora_te1",
    embedding_key="clip_l",
)
SDXL_TE2 = TextEncoderSpec(
    name="text_encoder_2",
    tokenizer="tokenizer_2",
    architecture="OpenCLIP ViT-bigG/14",
    model_class="CLIPTextModelWithProjection",
    hidden_size=1280,
    hidden_layer=-2,
    final_layer_norm=False,
    pooled=True,
    pad_token="!",
    kohya_prefix="lora_te2",
    hub_tokenizer="clip-bigg",
    embedding_key="clip_g",
)

SDXL = SDXLFamily(
    id="sdxl",
    display_name="Stable Diffusion XL",
    latent_channels=4,
    vae_scale_factor=8,
    vae_scaling_factor=0.13025,
    bucket_quantization=64,
    default_resolution=1024,
    prediction_type="epsilon",
    text_encoders=(SDXL_TE1, SDXL_TE2),
    uses_time_ids=True,
    kohya_base_model_version="sdxl_base_v1-0",
    kohya_v2=False,
    config_dir="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    unet_cross_attention_dim=2048,
    notes="The SDXL VAE overflows in fp16: keep it in fp32 or bf16.",
)

# Activation memory of the SDXL UNets, per latent pixel of one sample (see memory.py), measured by
# tests/bench/measure_coefficients.py.
ACTIVATION_PROFILES = (
    ActivationProfile(
        name='tiny-sdxl',
        signature=('UNet2DConditionModel', (16, 32), 2, ('DownBlock2D', 'CrossAttnDownBlock2D'), (1, 2), (2, 4), 80, True),
        dtype='fp32', width=16.0,
        base=16112.0, ckpt_base=4614.4,
        per_block=(),
        adapter_factor=1.36, first_step=1.23,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (16, 32, 48)",
    ),
    ActivationProfile(
        name='sdxl',
        signature=('UNet2DConditionModel', (320, 640, 1280), 2, ('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'), (1, 2, 10), (5, 10, 20), 2048, True),
        dtype='bf16', width=320.0,
        base=263753.1, ckpt_base=32630.9,
        per_block=(),
        adapter_factor=0.78, first_step=1.03,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (16, 24, 32)",
    ),
)
