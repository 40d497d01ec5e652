"""The family registry (``FAMILIES``, ``get_family``) and telling a family from checkpoint keys or configs.

Imported by the GUI process and by recipe validation, so it must stay free of torch, diffusers
and transformers (a test enforces it).

Detecting a family from a single-file checkpoint
-------------------------------------------------
Original-layout (A1111/Civitai) checkpoints are recognised by their text-encoder prefixes:

* ``conditioner.embedders.1.model.``        OpenCLIP ViT-bigG as second encoder  -> SDXL
* ``cond_stage_model.model.``               OpenCLIP ViT-H                       -> SD2
* ``cond_stage_model.transformer.``         OpenAI CLIP ViT-L (transformers)     -> SD1.5

SD2 comes in two flavours with identical keys and shapes: the 512 px base (epsilon prediction)
and the 768 px model (v-prediction). Nothing in the weights tells them apart reliably, so SD2 is
reported as ``sd2`` (epsilon) unless something *says* v-prediction: an explicit ``family="sd2-v"``
from the user or recipe, a ``v_pred`` marker key (ComfyUI writes one), safetensors metadata
(``modelspec.prediction_type`` / ``modelspec.architecture``), an original ``.yaml`` config beside
the checkpoint with ``parameterization: "v"``, or a diffusers scheduler config whose
``prediction_type`` is ``v_prediction``. Guessing wrong trains a broken model silently, so we do
not guess from resolution or file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .base import PREDICTION_TYPES, ModelFamily, ModelLoadError
from .flux import FLUX_DEV, FLUX_SCHNELL
from .sd import SD2, SD2_V, SD15
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {f.id: f for f in (SD15, SD2, SD2_V, SDXL, FLUX_DEV, FLUX_SCHNELL)}
_ALIASES = {"sd1": "sd15", "sd1.5": "sd15", "sd_v1": "sd15", "sd21": "sd2", "sd2.1": "sd2", "sd2v": "sd2-v", "sd-xl": "sdxl",
            "flux": "flux-dev", "flux1-dev": "flux-dev", "flux1-schnell": "flux-schnell"}


def get_family(family: "str | ModelFamily") -> ModelFamily:
    """Look a family up by id (or accept one); unknown ids raise a ``ModelLoadError`` listing the known ones."""
    if isinstance(family, ModelFamily):
        return family
    key = str(family).strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return FAMILIES[key]
    except KeyError:
        raise ModelLoadError(f"Unknown model family {family!r}; known families: {', '.join(FAMILIES)}.") from None


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Marker:
    family_id: str
    prefix: str
    meaning: str


# Order matters: SDXL checkpoints also contain a CLIP-L under a different prefix.
SINGLE_FILE_MARKERS: tuple[_Marker, ...] = (
    _Marker("sdxl", "conditioner.embedders.1.model.", "SDXL (CLIP-L + OpenCLIP ViT-bigG text encoders)"),
    _Marker("sd2", "cond_stage_model.model.", "SD2.x (OpenCLIP ViT-H text encoder)"),
    _Marker("sd15", "cond_stage_model.transformer.", "SD1.x (OpenAI CLIP ViT-L text encoder)"),
)

# Layouts we recognise but do not load (yet); naming them beats "unknown layout".
_UNSUPPORTED_MARKERS: tuple[tuple[str, str], ...] = (
    ("double_blocks.", "a Flux transformer, which loads from a .safetensors file (with ae, clip_l and t5xxl beside it)"),
    ("model.diffusion_model.double_blocks.", "a Flux transformer, which loads from a .safetensors file"),
    ("model.diffusion_model.joint_blocks.", "an SD3 transformer (not supported)"),
    ("joint_blocks.", "an SD3 transformer (not supported)"),
    ("lora_unet_", "a LoRA in kohya layout, not a base model"),
    ("lora_te", "a LoRA in kohya layout, not a base model"),
)

_V_PRED_ARCHITECTURE_HINTS = ("768-v", "-v-", "v-prediction", "v_prediction")


_LORA_MARKERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (a key part that only this architecture's LoRAs have, what it is, family ids it suits)
    ("double_blocks", "Flux.1", ("flux-dev", "flux-schnell")),
    ("single_blocks", "Flux.1", ("flux-dev", "flux-schnell")),
    ("transformer.transformer_blocks.", "Flux.1", ("flux-dev", "flux-schnell")),
    ("transformer.single_transformer_blocks.", "Flux.1", ("flux-dev", "flux-schnell")),
    ("lora_unet_down_blocks_", "Stable Diffusion (a UNet)", ("sd15", "sd2", "sd2-v", "sdxl")),
    ("lora_unet_input_blocks_", "Stable Diffusion (a UNet)", ("sd15", "sd2", "sd2-v", "sdxl")),
    ("unet.down_blocks.", "Stable Diffusion (a UNet)", ("sd15", "sd2", "sd2-v", "sdxl")),
    ("diffusion_model.input_blocks.", "Stable Diffusion (a UNet)", ("sd15", "sd2", "sd2-v", "sdxl")),
)


def foreign_lora_family(keys: Iterable[str], family: ModelFamily) -> str | None:
    """The architecture a LoRA file's keys were made for, when it is not ``family``'s (else None)."""
    for key in keys:
        for marker, what, ids in _LORA_MARKERS:
            if marker in key and family.id not in ids:
                return what
    return None


def _summarise_keys(keys: list[str], limit: int = 6) -> str:
    roots = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(roots[:limit])
    return shown + (f", ... ({len(roots)} prefixes)" if len(roots) > limit else "")


def detect_single_file_family(
    keys: Iterable[str],
    *,
    source: str = "checkpoint",
    metadata: Mapping[str, str] | None = None,
    original_config_text: str | None = None,
) -> ModelFamily:
    """Tell the family of an original-layout checkpoint from its tensor names.

    ``metadata`` (safetensors header metadata) and ``original_config_text`` (an LDM ``.yaml``
    found beside the file) only decide SD2 epsilon vs v-prediction; see the module docstring.
    """
    keys = list(keys)
    key_set = set(keys)
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)

    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not any(
        k.startswith("conditioner.embedders.1.") for k in keys
    ):
        raise ModelLoadError(
            f"{source}: this looks like the SDXL refiner (a single OpenCLIP encoder under "
            "conditioner.embedders.0.model.), which is not supported. Load the SDXL base model instead."
        )
    for marker in SINGLE_FILE_MARKERS:
        if any(k.startswith(marker.prefix) for k in keys):
            if not has_unet:
                raise ModelLoadError(
                    f"{source}: found the text encoder of {marker.meaning} but no UNet weights "
                    "(keys starting with 'model.diffusion_model.'). Use a full checkpoint."
                )
            family = get_family(marker.family_id)
            if family.id == "sd2" and _says_v_prediction(key_set, metadata, original_config_text):
                family = SD2_V
            return family

    for prefix, meaning in _UNSUPPORTED_MARKERS:
        if any(k.startswith(prefix) for k in keys):
            raise ModelLoadError(f"{source}: this file looks like {meaning}; it cannot be loaded as a base model.")

    looked_for = "; ".join(f"'{m.prefix}*' -> {m.meaning}" for m in SINGLE_FILE_MARKERS)
    if not keys:
        found = "no tensors at all"
    elif any(k.startswith(("down_blocks.", "up_blocks.", "conv_in.")) for k in keys):
        found = "diffusers-style component weights (use the diffusers folder it came from, or pass it as vae=)"
    else:
        found = f"keys such as: {_summarise_keys(keys)}"
    raise ModelLoadError(
        f"{source}: unknown checkpoint layout. Looked for text-encoder prefixes {looked_for} "
        f"(with UNet weights under 'model.diffusion_model.'), but found {found}. "
        "If this is a full SD1.5/SD2/SDXL model in another layout, convert it to a diffusers folder first."
    )


def _says_v_prediction(
    keys: set[str], metadata: Mapping[str, str] | None, original_config_text: str | None
) -> bool:
    if "v_pred" in keys:
        return True
    metadata = metadata or {}
    pred = str(metadata.get("modelspec.prediction_type", "")).lower()
    if pred in ("v", "v_prediction", "v-prediction"):
        return True
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if arch.startswith("stable-diffusion-v2") and any(h in arch for h in _V_PRED_ARCHITECTURE_HINTS):
        return True
    if original_config_text:
        for line in original_config_text.splitlines():
            stripped = line.split("#", 1)[0].strip().replace(" ", "")
            if stripped in ('parameterization:"v"', "parameterization:'v'", "parameterization:v"):
                return True
    return False


def detect_diffusers_family(
    model_index: Mapping | None,
    unet_config: Mapping,
    text_encoder_config: Mapping | None = None,
    scheduler_config: Mapping | None = None,
    *,
    source: str = "folder",
) -> ModelFamily:
    """Tell the family of a diffusers folder from its JSON configs.

    SDXL: pipeline class or ``addition_embed_type == "text_time"``. SD2 vs SD1.5: cross-attention
    width 1024 vs 768; for non-standard widths (tiny test models) linear attention projections mean
    SD2. v-prediction comes from the scheduler config.
    """
    pipeline = str((model_index or {}).get("_class_name", ""))
    if pipeline.startswith(("Flux", "StableDiffusion3")):
        raise ModelLoadError(f"{source}: {pipeline} folders are not supported yet.")
    is_xl_pipeline = pipeline.startswith("StableDiffusionXL")
    if is_xl_pipeline or unet_config.get("addition_embed_type") == "text_time":
        family = SDXL
    else:
        cross = unet_config.get("cross_attention_dim")
        if cross == 1024:
            family = SD2
        elif cross == 768:
            family = SD15
        else:
            family = SD2 if unet_config.get("use_linear_projection") else SD15
    pred = (scheduler_config or {}).get("prediction_type", "epsilon")
    if family.id == "sd2" and pred == "v_prediction":
        family = SD2_V
    elif pred in PREDICTION_TYPES:
        family = family.with_prediction_type(pred)
    return family
