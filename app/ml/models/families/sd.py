"""Stable Diffusion 1.5 and 2.x (epsilon and the 768 px v-prediction model): a UNet over 4-channel latents
that cross-attends to one CLIP text encoder, trained with DDPM noise (epsilon or v targets) and
sampled through diffusers' ``StableDiffusionPipeline``. SDXL (``sdxl.py``) extends this class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .base import ModelFamily, TextEncoderSpec
from .memory import ActivationProfile


@dataclass(frozen=True)
class SDFamily(ModelFamily):
    """UNet families: DDPM noise objective, CLIP text encoders, diffusers SD pipelines."""

    def check_components(self, denoiser, text_encoders, source: str) -> None:
        from .base import ModelLoadError

        width = sum(te.config.hidden_size for te in text_encoders)
        if denoiser.config.cross_attention_dim != width:
            raise ModelLoadError(
                f"{source}: the UNet cross-attends to width {denoiser.config.cross_attention_dim} but the "
                f"{self.display_name} text encoders give {width}; the components do not belong together."
            )

    # ------------------------------------------------------------------ text
    def encode_prompts(self, bundle, prompts: Sequence[str], *, clip_skip: int = 1, with_grad: bool = False,
                       chunks: int = 1) -> dict[str, Any]:
        """``{"prompt_embeds": B x 77 x D}`` (SDXL adds ``"pooled_prompt_embeds": B x P``), float32.

        SD1.5/SD2: the last hidden state after the final LayerNorm (``clip_skip=2`` takes the
        penultimate layer, still normalised, as A1111 does). SDXL: the penultimate hidden states
        of both encoders, not normalised, concatenated (768 + 1280 = 2048 for the real model),
        and the projected pooled output of the second encoder. ``chunks`` > 1 reads up to
        75 x chunks tokens: each 75-token piece is encoded on its own and the pieces are joined
        (``B x 77·chunks x D``), as A1111/ComfyUI prompt and kohya's ``max_token_length`` trains;
        the pooled output is the first piece's.
        """
        from contextlib import nullcontext

        import torch

        if clip_skip < 1:
            raise ValueError("clip_skip counts from 1 (1 = no skip)")
        ctx = nullcontext() if with_grad else torch.no_grad()
        hidden, pooled = [], None
        n = len(prompts)
        with ctx:
            for spec, te, ids in zip(self.text_encoders, bundle.text_encoders, bundle.tokenize(prompts, chunks)):
                ids = ids.reshape(-1, ids.shape[-1]).to(te.device)  # every piece is one encoder input
                layer = spec.hidden_layer - (clip_skip - 1)
                if layer == -1 and spec.final_layer_norm:  # the encoder's own output: no hidden states kept
                    out = te(ids)
                    h = out.last_hidden_state
                else:
                    out = te(ids, output_hidden_states=True)
                    h = out.hidden_states[layer]
                    if spec.final_layer_norm:
                        h = _final_layer_norm(te)(h)
                hidden.append(h.float().reshape(n, -1, h.shape[-1]))
                if spec.pooled:
                    pooled = out.text_embeds.float().reshape(n, chunks, -1)[:, 0]
        result = {"prompt_embeds": torch.cat(hidden, dim=-1)}
        if pooled is not None:
            result["pooled_prompt_embeds"] = pooled
        return result

    # ------------------------------------------------------------------ the denoiser call
    def conditioning(self, bundle, text: Mapping[str, Any], *, pixel_size: tuple[int, int], batch: int,
                     device, original_sizes=None, crops_top_left=None, guidance: float | None = None) -> dict[str, Any]:
        return {"encoder_hidden_states": text["prompt_embeds"]}

    def predict(self, denoiser, noisy, timesteps, cond: Mapping[str, Any]):
        return denoiser(noisy, timesteps, **cond).sample

    # ------------------------------------------------------------------ training
    def make_objective(self, bundle, settings):
        from app.ml.train.objective import NoiseObjective

        return NoiseObjective(bundle.make_noise_scheduler(), settings.objective, settings.zero_terminal_snr)

    # ------------------------------------------------------------------ sampling
    def build_pipeline(self, bundle, scheduler):
        """diffusers' pipeline over the bundle's modules (nothing is copied or moved)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def sample_text(self, bundle, *, prompt: str, negative_prompt: str, cfg: float, sampler: str, clip_skip: int,
                    device) -> dict[str, Any]:
        """The pipeline's text inputs as embeddings (``prompt_embeds``, ``negative_prompt_embeds``, SDXL's pooled
        ones), encoded by the pipeline's own ``encode_prompt`` exactly as its call would, so the text encoders can
        leave the device before the denoiser comes; prompts past 75 tokens are encoded in pieces (see
        ``_long_prompt_embeds``)."""
        from app.ml.sampling.generate import _long_prompt_embeds, build_pipeline
        from app.ml.sampling.samplers import make_scheduler

        long = _long_prompt_embeds(bundle, prompt, negative_prompt, clip_skip)
        if long:
            return long
        if clip_skip > 1 and any(spec.final_layer_norm for spec in self.text_encoders):
            # diffusers' SD pipeline reaches for text_model.final_layer_norm, which transformers 5's CLIPTextModel
            # no longer has; ours takes the same layer and norm (and skips on the negative prompt too, as A1111)
            return _long_prompt_embeds(bundle, prompt, negative_prompt, clip_skip, chunks=1)
        pipe = build_pipeline(bundle, make_scheduler(sampler, bundle.scheduler_config)[0])
        guided = cfg > 1 and bundle.unet.config.time_cond_proj_dim is None  # the pipeline's own test
        out = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=guided, negative_prompt=negative_prompt,
                                 clip_skip=(clip_skip - 1) or None)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return dict(zip(names, out))  # SD gives the first two, SDXL all four

    def sample_latents(self, bundle, *, text: Mapping[str, Any], negative_prompt: str, width: int, height: int,
                       steps: int, cfg: float, seed: int, sampler: str, check_cancel=None):
        """Denoise from ``text`` (``sample_text``'s embeddings); the text encoders are not used."""
        import torch

        from app.ml.sampling.generate import _step_check, build_pipeline
        from app.ml.sampling.samplers import make_scheduler

        scheduler, impl = make_scheduler(sampler, bundle.scheduler_config, seed=seed)
        pipe = build_pipeline(bundle, scheduler)
        gen = torch.Generator("cpu").manual_seed(seed)
        kwargs = dict(width=width, height=height, num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                      output_type="latent", **text)
        if check_cancel is not None:
            check_cancel()
            kwargs["callback_on_step_end"] = _step_check(check_cancel)
        return pipe(**kwargs).images, impl


def _final_layer_norm(text_encoder):
    """transformers 5 flattened CLIPTextModel; CLIPTextModelWithProjection still nests text_model."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


CLIP_L = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="CLIP ViT-L/14",
    model_class="CLIPTextModel",
    hidden_size=768,
)
OPENCLIP_H = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="OpenCLIP ViT-H/14 (23 of 24 layers, i.e. the penultimate layer + final norm)",
    model_class="CLIPTextModel",
    hidden_size=1024,
    pad_token="!",
)

SD15 = SDFamily(
    id="sd15",
    display_name="Stable Diffusion 1.5",
    latent_channels=4,
    vae_scale_factor=8,
    vae_scaling_factor=0.18215,
    bucket_quantization=8,
    default_resolution=512,
    prediction_type="epsilon",
    text_encoders=(CLIP_L,),
    uses_time_ids=False,
    kohya_base_model_version="sd_v1",
    kohya_v2=False,
    config_dir="sd15",
    pipeline_class="StableDiffusionPipeline",
    unet_cross_attention_dim=768,
)
SD2 = replace(  # the SD 1.5 layout with an OpenCLIP-H text encoder
    SD15,
    id="sd2",
    display_name="Stable Diffusion 2.x (512, epsilon)",
    text_encoders=(OPENCLIP_H,),
    kohya_base_model_version="sd_v2",
    kohya_v2=True,
    config_dir="sd2",
    unet_cross_attention_dim=1024,
    notes="Same weights layout as sd2-v; choose sd2-v for the 768 px v-prediction models.",
)
SD2_V = replace(
    SD2,
    id="sd2-v",
    display_name="Stable Diffusion 2.x 768 (v-prediction)",
    default_resolution=768,
    prediction_type="v_prediction",
    kohya_base_model_version="sd_v2_v",  # what kohya's sd-scripts write for SD 2.x v-prediction
    config_dir="sd2-v",
    notes="Cannot be told from sd2 by its weights; selected explicitly or by config/metadata.",
)

# Activation memory of the UNets this module trains, per latent pixel of one sample (see memory.py),
# measured by tests/bench/measure_coefficients.py: the memory planner's data, not a table per GPU.
ACTIVATION_PROFILES = (
    ActivationProfile(
        name='tiny-sd',
        signature=('UNet2DConditionModel', (16, 32), 2, ('CrossAttnDownBlock2D', 'DownBlock2D'), 1, 4, 32, False),
        dtype='fp32', width=16.0,
        base=12774.4, ckpt_base=5139.2,
        per_block=(),
        adapter_factor=1.48, first_step=1.26,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (16, 32, 48)",
    ),
    ActivationProfile(
        name='shapes-sd',
        signature=('UNet2DConditionModel', (32, 64), 1, ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'), 1, 8, 32, False),
        dtype='fp32', width=32.0,
        base=21574.4, ckpt_base=8624.0,
        per_block=(),
        adapter_factor=0.91, first_step=1.04,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (16, 32, 48)",
    ),
    ActivationProfile(
        name='sd15',
        signature=('UNet2DConditionModel', (320, 640, 1280, 1280), 2, ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'), 1, 8, 768, False),
        dtype='bf16', width=320.0,
        base=84864.0, ckpt_base=20556.8,
        per_block=(),
        adapter_factor=0.66, first_step=1.37,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (8, 16, 24)",
    ),
)
