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
