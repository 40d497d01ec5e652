"""Flux.1 dev and schnell as data: where their offline configs live and the defaults that differ (backs
the Flux family's component loading from split or single files, and its sampling defaults).

The configs in ``configs/flux1-dev`` and ``configs/flux1-schnell`` are the diffusers repository
configs, so a user's single ``flux1-dev.safetensors`` (+ ``ae``, ``clip_l``, ``t5xxl``) loads offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
COMPONENT_FILES = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
}


@dataclass(frozen=True)
class FluxVariant:
    name: str  # dev | schnell
    config_dir: str
    guidance_embeds: bool  # dev is guidance-distilled: the guidance value is a model input
    t5_max_length: int  # prompt tokens T5 is padded to (kohya: 512 dev, 256 schnell)
    sample_steps: int
    sample_guidance: float  # dev: the embedded guidance; schnell ignores it


VARIANTS = {
    "dev": FluxVariant("dev", "flux1-dev", True, 512, 28, 3.5),
    "schnell": FluxVariant("schnell", "flux1-schnell", False, 256, 4, 0.0),
}


def variant(name: str, where: str = "Flux") -> FluxVariant:
    if name not in VARIANTS:
        raise ValueError(f"{where}: unknown Flux variant {name!r}; choose one of {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def config(name: str, component: str, where: str = "Flux") -> dict[str, Any]:
    """A full-size component config (``transformer``, ``vae``, ``scheduler``, ``text_encoder``, ``text_encoder_2``)."""
    if component not in COMPONENT_FILES:
        raise ValueError(f"{where}: unknown Flux component {component!r}; choose one of {', '.join(COMPONENT_FILES)}.")
    path = CONFIGS / variant(name, where).config_dir / COMPONENT_FILES[component]
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- a LoRA of one variant on the other
GUIDANCE_MODULE = "time_text_embed.guidance_embedder."  # dev's guidance embedder (BFL: guidance_in.in_layer/out_layer)
_GUIDANCE_KEY_MARKS = ("guidance_in", "guidance_embedder")  # kohya lora_unet_guidance_in_…, comfyui/peft names


def lora_variant(metadata: dict, keys) -> str:
    """``dev``, ``schnell`` or ``""`` (unknown) for a Flux LoRA file: our own family record, then the modelspec
    architecture kohya and ComfyUI write (``flux-1-dev`` / ``flux-1-schnell``), then a guidance-embedder
    module (only dev has one). kohya's ``ss_base_model_version`` is ``flux1`` for both, so it says nothing."""
    fam = metadata.get("nodetrainer_base_family", "")
    arch = metadata.get("modelspec.architecture", "")
    for text in (fam, arch):
        if "schnell" in text:
            return "schnell"
        if "dev" in text:
            return "dev"
    return "dev" if any(mark in k for k in keys for mark in _GUIDANCE_KEY_MARKS) else ""


def guidance_modules_in(keys) -> list[str]:
    """The guidance-embedder modules a LoRA file adapts, by their names in the file (without the tensor name)."""
    import re

    tensor = re.compile(r"\.(lora_(down|up|A|B|mid)|hada_\w+|lokr_\w+|dora_scale|lora_magnitude_vector|alpha)(\.\w+)?$")
    return sorted({tensor.sub("", k) for k in keys if any(mark in k for mark in _GUIDANCE_KEY_MARKS)})


def cross_variant_warnings(file: str, lora: str, model: str, guidance_modules) -> list[str]:
    """What LoadLoRA tells a user who applies a dev LoRA to schnell (or the reverse). The two share every
    transformer block, so kohya and ComfyUI apply such LoRAs and users do; only dev's guidance embedder is
    missing on schnell, and a LoRA's modules there are skipped rather than refusing the whole file."""
    names = {"dev": "Flux.1 dev", "schnell": "Flux.1 schnell"}
    out = []
    if lora and lora != model:
        out.append(f"{file} was trained on {names[lora]}; the model is {names[model]}. The transformer blocks are the "
                   f"same, so it applies (as in kohya and ComfyUI), but {names[model]} was distilled differently: "
                   "results can differ from the LoRA's own samples")
    if model == "schnell" and guidance_modules:
        out.append(f"{file}: skipped {len(guidance_modules)} module(s) of dev's guidance embedder, which "
                   f"{names[model]} does not have: {', '.join(guidance_modules)}")
    return out
