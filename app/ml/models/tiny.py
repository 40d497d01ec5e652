"""Tiny, seeded SD1.5-like and SDXL-like models for tests and demos (``builtin:tiny-sd``, ``builtin:tiny-sdxl``),
and a tiny SD1.5-like model trained to draw coloured shapes (``builtin:shapes-sd``).

They use the real diffusers/transformers classes with the real block types (CrossAttnDownBlock2D,
DownBlock2D, text_time additional embeddings, CLIP and CLIP-with-projection text encoders) and a
4-level VAE, so every module and state-dict key has the same name as in the full-size models and
the VAE downsamples by 8 like the real one; only the widths and depths are small. LoRA injection,
key conversion and kohya naming can therefore be tested on them and hold for the real thing.

Weights are initialised under a fixed seed inside ``torch.random.fork_rng`` (the caller's RNG
state is untouched), on CPU in fp32, so the same model is bit-identical in every process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .families import SD15, SDXL, ModelFamily, ModelLoadError

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_clip_tokenizer"
CONFIGS = Path(__file__).resolve().parent / "configs"

_MAX_LENGTH = 77


@dataclass(frozen=True)
class TinySpec:
    name: str
    family: ModelFamily
    seed: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # CLIPTextConfig kwargs, plus "_class"
    weights: str | None = None  # folder under assets/ with trained weights; None = seeded random weights


# The real SD/SDXL factors (0.18215, 0.13025) were chosen as 1 / std of their VAEs' latents, so the
# UNet sees unit-variance latents. The random tiny VAEs' latents have a std of about 0.23, so their
# factor is chosen the same way; with the real factor the latents would be ~0.04 against unit noise
# and a tiny model could barely learn anything conditional from them.
TINY_VAE_SCALING_FACTOR = 4.4


def _vae_config(scaling_factor: float) -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _te_config(hidden: int, layers: int, heads: int, act: str, pad_token_id: int, cls: str) -> dict[str, Any]:
    return dict(
        _class=cls,
        vocab_size=_tokenizer_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=_MAX_LENGTH,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=_tokenizer_vocab_size() - 2,
        eos_token_id=_tokenizer_vocab_size() - 1,
        pad_token_id=pad_token_id,
    )


_VOCAB_SIZE: int | None = None


def _tokenizer_vocab_size() -> int:
    global _VOCAB_SIZE
    if _VOCAB_SIZE is None:
        _VOCAB_SIZE = len(json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")))
    return _VOCAB_SIZE


def _specs() -> dict[str, TinySpec]:
    eos = _tokenizer_vocab_size() - 1
    te1_hidden, te2_hidden, time_dim = 32, 48, 8
    return {
        "tiny-sd": TinySpec(
            name="tiny-sd",
            family=SD15,
            seed=1234,
            unet=dict(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=te1_hidden,
                attention_head_dim=4,
                norm_num_groups=8,
            ),
            vae=_vae_config(TINY_VAE_SCALING_FACTOR),
            text_encoders=(_te_config(te1_hidden, 3, 4, "quick_gelu", eos, "CLIPTextModel"),),
        ),
        "tiny-sdxl": TinySpec(
            name="tiny-sdxl",
            family=SDXL,
            seed=4321,
            unet=dict(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                cross_attention_dim=te1_hidden + te2_hidden,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=te2_hidden + 6 * time_dim,
                norm_num_groups=8,
            ),
            vae=_vae_config(TINY_VAE_SCALING_FACTOR),
            text_encoders=(
                _te_config(te1_hidden, 3, 4, "quick_gelu", eos, "CLIPTextModel"),
                _te_config(te2_hidden, 3, 4, "gelu", 0, "CLIPTextModelWithProjection"),
            ),
        ),
    }


TINY_NAMES = ("tiny-sd", "tiny-sdxl")

# ``builtin:shapes-sd``: the same kind of tiny SD1.5-like model, but trained (by
# ``assets/train_shapes_sd.py``, weights in ``assets/shapes_sd/``) to draw coloured shapes, so a demo
# LoRA on it has something visible to change. Its VAE factor is 1 / std of its own latents, recorded
# by the training script in ``shapes_sd/model.json``.
SHAPES_SD_DIR = ASSETS / "shapes_sd"
SHAPES_SD_COMPONENTS = ("unet", "vae", "text_encoder")


def _shapes_sd_scaling_factor() -> float:
    path = SHAPES_SD_DIR / "model.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["vae_scaling_factor"])
    except FileNotFoundError:
        return 1.0  # only while the training script builds the model for the first time
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"builtin:shapes-sd: {path} is unreadable ({exc}); rebuild it with app/ml/models/assets/train_shapes_sd.py.") from exc


def shapes_sd_spec() -> TinySpec:
    eos = _tokenizer_vocab_size() - 1
    return TinySpec(
        name="shapes-sd",
        family=SD15,
        seed=2024,
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        vae=dict(_vae_config(_shapes_sd_scaling_factor()), block_out_channels=(16, 32, 32, 32), norm_num_groups=8),
        text_encoders=(_te_config(32, 2, 4, "quick_gelu", eos, "CLIPTextModel"),),
        weights="shapes_sd",
    )


def tiny_spec(name: str) -> TinySpec:
    specs = _specs()
    specs["shapes-sd"] = shapes_sd_spec()
    if name not in specs:
        raise ModelLoadError(f"Unknown builtin model 'builtin:{name}'; available: "
                             + ", ".join(f"builtin:{n}" for n in [*specs, "tiny-flux"]))
    return specs[name]


def load_tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    """The shipped tiny CLIP tokenizer (transformers 5 needs model_max_length passed explicitly)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), model_max_length=_MAX_LENGTH, pad_token=pad_token)


def build_tiny_components(name: str) -> dict[str, Any]:
    """Build a tiny model's components in fp32 on CPU: unet (the denoiser), vae, text_encoders, tokenizers,
    scheduler_config. ``tiny-flux`` comes from ``app/ml/flux/tiny.py``."""
    if name == "tiny-flux":
        return _build_tiny_flux()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = tiny_spec(name)
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel(**spec.unet)
        torch.manual_seed(spec.seed + 1)
        vae = AutoencoderKL(**spec.vae)
        text_encoders = []
        for i, te_kwargs in enumerate(spec.text_encoders):
            kwargs = dict(te_kwargs)
            cls = classes[kwargs.pop("_class")]
            torch.manual_seed(spec.seed + 2 + i)
            text_encoders.append(cls(CLIPTextConfig(**kwargs)))
    if spec.weights is not None:
        _load_trained_weights(spec, {"unet": unet, "vae": vae, "text_encoder": text_encoders[0]})
    tokenizers = [load_tiny_tokenizer(te.pad_token) for te in spec.family.text_encoders]
    scheduler_config = json.loads((CONFIGS / spec.family.config_dir / "scheduler" / "scheduler_config.json").read_text())
    return {
        "family": spec.family,
        "unet": unet,
        "vae": vae,
        "text_encoders": text_encoders,
        "tokenizers": tokenizers,
        "scheduler_config": scheduler_config,
    }


def _build_tiny_flux() -> dict[str, Any]:
    """The tiny Flux.1-dev-like model (guidance embedder on); its T5 reads the tiny prompts' 32 tokens."""
    from app.ml.flux import tiny as flux_tiny

    from .families import FLUX_DEV

    parts = flux_tiny.build_tiny_flux(guidance=True)
    parts["tokenizer_2"].model_max_length = flux_tiny.T5_MAX_LENGTH
    # as for tiny-sd (see TINY_VAE_SCALING_FACTOR): the random VAE's latents have a std near 0.23, so the real
    # Flux factor 0.3611 would leave them at ~0.08 against unit noise and the tiny model could barely learn
    parts["vae"].register_to_config(scaling_factor=TINY_VAE_SCALING_FACTOR)
    scheduler = flux_tiny.component_config("scheduler")
    return {
        "family": FLUX_DEV,
        "unet": parts["transformer"],
        "vae": parts["vae"],
        "text_encoders": [parts["text_encoder"], parts["text_encoder_2"]],
        "tokenizers": [parts["tokenizer"], parts["tokenizer_2"]],
        "scheduler_config": scheduler,
    }


def _load_trained_weights(spec: TinySpec, modules: dict[str, Any], folder: Path | None = None) -> None:
    """Load ``<component>.safetensors`` (stored in fp16 to keep the repo small) into the fp32 modules, strictly."""
    from safetensors.torch import load_file

    folder = folder or ASSETS / str(spec.weights)
    for name, module in modules.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise ModelLoadError(
                f"builtin:{spec.name}: {path} is missing; rebuild it with python app/ml/models/assets/train_shapes_sd.py."
            )
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"builtin:{spec.name}: {path} does not fit the model (missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}); rebuild it with python app/ml/models/assets/train_shapes_sd.py."
            )
