"""Generate preview images from a ModelBundle, optionally with adapters attached at a strength.

We drive diffusers' own pipelines (the family's: SD, SDXL, Flux), built around the bundle's components (no copies), so a
preview is exactly what a diffusers user gets from the same weights; the adapters are attached
only for the call (``attached``). The pipeline stops at latents and the bundle decodes them, which
keeps the pipeline from upcasting a shared fp16 VAE in place.

Determinism: every image has its own seed (``seed + i`` for the i-th image, A1111's convention for
a batch) and its own CPU generator, so an image is reproducible from its recorded seed alone,
regardless of batch composition or device. ``seed=None`` draws a random seed and records it.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from app.ml.adapters import attached
from app.ml.adapters.attach import _normalise
from app.ml.memory.placement import current

from .samplers import canonical_sampler


@dataclass
class SampleResult:
    images: list[Image.Image]
    params: list[dict[str, Any]]  # one per image: prompt, seed, sampler, ... (what the PNG records)
    latents: list[torch.Tensor] = field(default_factory=list)  # final latents, float32 (for tests/previews)


def build_pipeline(bundle, scheduler):
    """The family's diffusers pipeline sharing the bundle's modules (nothing is copied or moved)."""
    pipe = bundle.family.build_pipeline(bundle, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float B x 3 x H x W -> PIL, rounded like diffusers' image processor."""
    arr = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def _long_prompt_embeds(bundle, prompt: str, negative_prompt: str, clip_skip: int,
                        chunks: int | None = None) -> dict:
    """Past 75 tokens, prompts are encoded in 75-token pieces (as A1111 and ComfyUI do, and as
    TrainLoop's max_tokens trains); shorter prompts are left to the pipeline's own ``encode_prompt``
    (returns {})."""
    if chunks is None:
        limit = bundle.token_limit()
        longest = max(bundle.token_counts([prompt, negative_prompt]))
        if longest <= limit:
            return {}
        chunks = -(-longest // limit)
    pos = bundle.encode_prompts([prompt], clip_skip=clip_skip, chunks=chunks)
    neg = bundle.encode_prompts([negative_prompt], clip_skip=clip_skip, chunks=chunks)
    device = current().device  # where the denoiser computes; the text encoders are there now too
    out = {"prompt_embeds": pos["prompt_embeds"].to(device), "negative_prompt_embeds": neg["prompt_embeds"].to(device)}
    if "pooled_prompt_embeds" in pos:
        out["pooled_prompt_embeds"] = pos["pooled_prompt_embeds"].to(device)
        out["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"].to(device)
    return out


# What the pipelines hand the denoiser in the text encoders' dtype: the latents and the text embeddings.
# Timesteps, guidance, positions and SDXL's size ids stay as they are (bf16 would round 999 to 1000).
_CAST_ARGS = ("sample", "hidden_states", "encoder_hidden_states", "pooled_projections")
_CAST_ADDED = ("text_embeds",)


@contextmanager
def _denoiser_dtype_inputs(bundle):
    """A denoiser loaded in another precision than the text encoders (e.g. a bf16 UNet beside an fp32
    CLIP) gets its inputs in its own dtype: the diffusers pipelines make latents and embeddings in the
    text encoder's dtype, and the first layer would refuse the mix."""
    denoiser = bundle.denoiser
    dtype = next(denoiser.parameters()).dtype
    if all(next(te.parameters()).dtype == dtype for te in bundle.text_encoders):
        yield
        return

    def cast(t):
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype else t

    def pre_hook(module, args, kwargs):
        args = (cast(args[0]), *args[1:]) if args else args
        kwargs = {k: cast(v) if k in _CAST_ARGS else v for k, v in kwargs.items()}
        added = kwargs.get("added_cond_kwargs")
        if isinstance(added, dict):
            kwargs["added_cond_kwargs"] = {k: cast(v) if k in _CAST_ADDED else v for k, v in added.items()}
        return args, kwargs

    handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _step_check(check_cancel):
    """diffusers' per-step callback: it must hand the tensors back; raising stops the pipeline."""
    def on_step_end(pipe, step, timestep, tensors):
        check_cancel()
        return tensors

    return on_step_end


def sample_images(
    bundle,
    prompts: "str | Sequence[str]",
    *,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    steps: int = 20,
    cfg: float = 7.0,
    seed: int | None = None,
    sampler: str = "Euler a",
    images_per_prompt: int = 1,
    adapters=None,
    strength: float = 1.0,
    clip_skip: int = 1,
    progress=None,
    check_cancel=None,
    options: "dict[str, Any] | None" = None,
) -> SampleResult:
    """Generate ``images_per_prompt`` images per prompt.

    ``clip_skip`` counts like A1111 (1 = last layer). ``adapters``: an AdapterSet, a list of them,
    or ``(set, strength)`` pairs; ``strength`` applies to bare sets. ``progress(i, total)`` is called
    after each image so a node can report progress; ``check_cancel()`` after every denoising step,
    so that a stop request (which it raises as an exception) ends a long sample within one step.
    Components not already on the compute device visit it one after another (text encoders, then the
    denoiser, then the VAE; adapters with the first two) and go back where they were (during training:
    the run's placement, so a streamed denoiser keeps streaming). ``progress`` counts denoised images.
    ``steps`` 0 is the model's default (``family.sample_steps``: Flux schnell 4). ``options``: sampling
    settings only some families have (``family.sample_options``, e.g. Flux's ``true_cfg``), recorded too.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    width = int(width or bundle.family.default_resolution)
    height = int(height or bundle.family.default_resolution)
    bundle.family.check_size(width, height, "Sample")
    steps = int(steps) or bundle.family.sample_steps
    if steps < 1:
        raise ValueError("steps must be at least 1")
    options = dict(options or {})
    unknown = sorted(set(options) - set(bundle.family.sample_options))
    if unknown:
        raise ValueError(f"Sample: {', '.join(unknown)} is not a sampling setting of {bundle.family.display_name} "
                         "models; leave it at its default (their guidance is the cfg param)")
    if clip_skip < 1:
        raise ValueError("clip_skip counts from 1 (1 = no skip)")
    sampler = canonical_sampler(sampler)
    base_seed = int(seed) if seed is not None else random.randrange(2**32)
    jobs = [(p, base_seed + i * len(prompts) + j) for i in range(images_per_prompt) for j, p in enumerate(prompts)]
    images: list[Image.Image] = []
    params: list[dict[str, Any]] = []
    latents_out: list[torch.Tensor] = []
    family, place = bundle.family, current()
    extras = [a for a, _ in _normalise(adapters, strength)]  # small; they ride along with what they patch
    decoded: list[torch.Tensor] = []
    with attached(bundle, adapters, strength), torch.no_grad():
        # One component on the device at a time, so a sample peaks at the largest component, not their sum
        # (Flux: T5 9.5 GB, then the transformer 24 GB, then the VAE). 1: the prompts become embeddings.
        text: dict[str, dict] = {}
        with place.visit(*bundle.text_encoders, *extras):
            for prompt in dict.fromkeys(p for p, _ in jobs):
                text[prompt] = family.sample_text(bundle, prompt=prompt, negative_prompt=negative_prompt, cfg=cfg,
                                                  sampler=sampler, clip_skip=clip_skip, device=place.device, **options)
        # 2: the denoiser (a streamed one keeps streaming: ``visit`` leaves it as the run placed it).
        with place.visit(bundle.denoiser, *extras), _denoiser_dtype_inputs(bundle):
            for n, (prompt, s) in enumerate(jobs):
                latents, impl = family.sample_latents(
                    bundle, text=text[prompt], negative_prompt=negative_prompt, width=width, height=height,
                    steps=steps, cfg=cfg, seed=s, sampler=sampler, check_cancel=check_cancel, **options)
                decoded.append(latents)
                latents_out.append(latents[0].float().cpu())
                params.append({
                    "prompt": prompt, "negative_prompt": negative_prompt, "width": width, "height": height,
                    "steps": steps, "cfg": cfg, "seed": s, "sampler": sampler, "sampler_impl": impl,
                    "clip_skip": clip_skip, "strength": strength if adapters is not None else None,
                    "model_family": family.id, "model_hash": bundle.identity, **options,
                })
                if progress is not None:
                    progress(n + 1, len(jobs))
        del text
        # 3: the VAE turns the latents into images.
        with place.visit(bundle.vae):
            for latents in decoded:
                images.extend(to_pil(bundle.decode_latents(latents)))
    return SampleResult(images, params, latents_out)
