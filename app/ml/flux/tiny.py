"""Tiny, seeded Flux.1-like components for tests (backs the Flux family's ``builtin:tiny-flux`` loading).

They use the real classes Flux uses (diffusers' ``FluxTransformer2DModel`` with double- and
single-stream blocks and the guidance embedder, a 16-channel ``AutoencoderKL`` without quant convs
that downsamples by 8, transformers' ``CLIPTextModel`` and ``T5EncoderModel``), so every module and
state-dict key has the same name as in Flux.1 dev/schnell; only widths and depths are small. Key
conversion, packing, LoRA naming and the objective can therefore be tested on them and hold for the
real model. Configs live as JSON data in ``configs/tiny_flux/``.

Weights are initialised under a fixed seed inside ``torch.random.fork_rng`` (the caller's RNG state
is untouched), on CPU in fp32, so the same model is bit-identical in every process.

The VAE keeps Flux's real latent factors (shift 0.1159, scale 0.3611) so ``latents.encode_scale``
is exercised with the numbers real files carry; its random weights make latents whose spread is not
the real VAE's, which is harmless for the shape and conversion tests these components serve. A tiny
model meant to *learn* from images should pick factors from its own latents, as
``app/ml/models/tiny.py`` explains for SD.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny_flux"
SEED = 5150
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 32  # tiny prompts; the real dev model pads to 512, schnell to 256


def component_config(name: str) -> dict[str, Any]:
    """The JSON config of one tiny component (``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``)."""
    path = CONFIGS / f"{name}.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"builtin:tiny-flux: cannot read its {name} config {path} ({exc}); reinstall the package.") from exc
    cfg.pop("_class_name", None)
    return cfg


@lru_cache(maxsize=1)
def _clip_vocab_size() -> int:
    from app.ml.models.tiny import TINY_TOKENIZER_DIR

    return len(json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")))


def load_clip_tokenizer():
    """The project's shipped tiny CLIP tokenizer (the same one the tiny SD models use)."""
    from app.ml.models.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


def load_t5_tokenizer(cache: Path | None = None):
    from .t5_tokenizer import load_tiny_t5_tokenizer

    return load_tiny_t5_tokenizer(cache)


def build_transformer(guidance: bool = True, seed: int = SEED):
    """The tiny transformer; ``guidance=False`` gives the schnell-like variant (no guidance embedder)."""
    from diffusers import FluxTransformer2DModel

    cfg = component_config("transformer")
    cfg["guidance_embeds"] = guidance
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**cfg)


def build_vae(seed: int = SEED + 1):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**component_config("vae"))


def build_clip(seed: int = SEED + 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _clip_vocab_size()
    cfg = CLIPTextConfig(**component_config("text_encoder"), vocab_size=vocab, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(cfg)


def build_t5(seed: int = SEED + 3):
    from transformers import T5Config, T5EncoderModel

    from .t5_tokenizer import VOCAB_SIZE

    cfg = T5Config(**component_config("text_encoder_2"), vocab_size=VOCAB_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(cfg)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**component_config("scheduler"))


def build_tiny_flux(guidance: bool = True, tokenizer_cache: Path | None = None) -> dict[str, Any]:
    """All tiny components in fp32 on CPU, keyed like ``FluxPipeline``'s constructor arguments."""
    models = {
        "transformer": build_transformer(guidance),
        "vae": build_vae(),
        "text_encoder": build_clip(),
        "text_encoder_2": build_t5(),
    }
    for m in models.values():
        m.eval()
    return {
        **models,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_t5_tokenizer(tokenizer_cache),
        "scheduler": build_scheduler(),
    }


def tiny_flux_pipeline(components: dict[str, Any] | None = None):
    """diffusers' ``FluxPipeline`` over the tiny components (proves the configs fit together)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**(components or build_tiny_flux()))
