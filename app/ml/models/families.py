"""Model families: everything that differs between SD1.5, SD2, SDXL (and later Flux) as plain data.

Code elsewhere asks the family ("how many latent channels?", "which hidden layer of which text
encoder?", "what does kohya write in ss_base_model_version?") instead of branching on names, so a
new family is one more ``ModelFamily`` entry plus, where its architecture is new, one more loader.

This module is imported by the GUI process and by recipe validation, so it must stay free of torch,
diffusers and transformers (a test enforces it).

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

from dataclasses import dataclass, replace
from typing import Iterable, Mapping


class ModelLoadError(Exception):
    """A model could not be loaded; the message says which file and what to do about it."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and how its output is used.

    ``hidden_layer``: -1 = last layer, -2 = penultimate. ``final_layer_norm`` says whether the
    encoder's final LayerNorm is applied to that layer (SD1.5/SD2 yes, SDXL no). ``pooled`` says
    whether the family consumes its pooled (projected) output.
    """

    name: str  # component name: "text_encoder", "text_encoder_2"
    tokenizer: str  # component name: "tokenizer", "tokenizer_2"
    architecture: str  # human description: "CLIP ViT-L/14", "OpenCLIP ViT-bigG/14"
    model_class: str  # transformers class name
    hidden_size: int
    hidden_layer: int = -1
    final_layer_norm: bool = True
    pooled: bool = False
    pad_token: str = "<|endoftext|>"
    kohya_prefix: str = "lora_te"  # "lora_te" (single TE), "lora_te1", "lora_te2"
    hub_tokenizer: str = "clip-l"  # key into HUB_TOKENIZERS: where a missing tokenizer is fetched from


@dataclass(frozen=True)
class ModelFamily:
    """What a trainer needs to know about one base-model family (real, full-size values)."""

    id: str
    display_name: str
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel
    vae_scaling_factor: float  # multiply VAE latents by this before the UNet sees them
    bucket_quantization: int  # bucket sides are multiples of this (pixels)
    default_resolution: int
    prediction_type: str  # "epsilon" | "v_prediction"
    text_encoders: tuple[TextEncoderSpec, ...]
    uses_time_ids: bool  # SDXL micro-conditioning (original size, crop, target size)
    kohya_base_model_version: str  # ss_base_model_version
    kohya_v2: bool  # ss_v2
    config_dir: str  # folder name under app/ml/models/configs/
    pipeline_class: str  # diffusers pipeline class name written in model_index.json
    vae_shift_factor: float | None = None
    unet_cross_attention_dim: int = 0
    notes: str = ""

    @property
    def kohya_metadata(self) -> dict[str, str]:
        """The kohya/A1111 metadata values saved LoRAs carry for this family."""
        return {
            "ss_base_model_version": self.kohya_base_model_version,
            "ss_v2": "True" if self.kohya_v2 else "False",
            "ss_v_parameterization": "True" if self.prediction_type == "v_prediction" else "False",
        }

    @property
    def text_embedding_dim(self) -> int:
        """Width of the prompt embeddings the UNet cross-attends to."""
        return sum(te.hidden_size for te in self.text_encoders)

    def with_prediction_type(self, prediction_type: str) -> "ModelFamily":
        """The same family trained with another objective (e.g. a v-prediction SD1.5 fine-tune)."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == self.prediction_type:
            return self
        return replace(self, prediction_type=prediction_type)


PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class HubTokenizer:
    """A tokenizer on the Hugging Face hub, fetched once into the user's HF cache when a model lacks one.

    ``files``: the only files downloaded (``allow_patterns``); a tokenizer is a few MB, the repos
    also hold multi-GB weights we never want. ``essential``: the files a user fetching it by hand needs.
    """

    repo_id: str
    files: tuple[str, ...]
    description: str
    essential: tuple[str, ...] = ("vocab.json", "merges.txt")


_CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# The one table of hub tokenizers, as kohya and ComfyUI use them. SD2's OpenCLIP ViT-H tokenizes
# with the same OpenAI CLIP BPE vocabulary as CLIP-L (only padding differs, and padding comes from
# the family, never from the downloaded files), so it shares the CLIP-L download.
HUB_TOKENIZERS: dict[str, HubTokenizer] = {
    "clip-l": HubTokenizer("openai/clip-vit-large-patch14", _CLIP_TOKENIZER_FILES, "CLIP ViT-L/14"),
    "clip-bigg": HubTokenizer(
        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", _CLIP_TOKENIZER_FILES, "OpenCLIP ViT-bigG/14"
    ),
    "t5-xxl": HubTokenizer(  # Flux's second text encoder (the Flux family arrives later)
        "google/t5-v1_1-xxl", ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
        "T5 v1.1 XXL", essential=("spiece.model",),
    ),
}

_CLIP_L = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="CLIP ViT-L/14",
    model_class="CLIPTextModel",
    hidden_size=768,
)
_OPENCLIP_H = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="OpenCLIP ViT-H/14 (23 of 24 layers, i.e. the penultimate layer + final norm)",
    model_class="CLIPTextModel",
    hidden_size=1024,
    pad_token="!",
)
_SDXL_TE1 = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="CLIP ViT-L/14",
    model_class="CLIPTextModel",
    hidden_size=768,
    hidden_layer=-2,
    final_layer_norm=False,
    kohya_prefix="lora_te1",
)
_SDXL_TE2 = TextEncoderSpec(
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
)

SD15 = ModelFamily(
    id="sd15",
    display_name="Stable Diffusion 1.5",
    latent_channels=4,
    vae_scale_factor=8,
    vae_scaling_factor=0.18215,
    bucket_quantization=8,
    default_resolution=512,
    prediction_type="epsilon",
    text_encoders=(_CLIP_L,),
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
    text_encoders=(_OPENCLIP_H,),
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
    kohya_base_model_version="sd_v2_768_v",
    config_dir="sd2-v",
    notes="Cannot be told from sd2 by its weights; selected explicitly or by config/metadata.",
)
SDXL = ModelFamily(
    id="sdxl",
    display_name="Stable Diffusion XL",
    latent_channels=4,
    vae_scale_factor=8,
    vae_scaling_factor=0.13025,
    bucket_quantization=64,
    default_resolution=1024,
    prediction_type="epsilon",
    text_encoders=(_SDXL_TE1, _SDXL_TE2),
    uses_time_ids=True,
    kohya_base_model_version="sdxl_base_v1-0",
    kohya_v2=False,
    config_dir="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    unet_cross_attention_dim=2048,
    notes="The SDXL VAE overflows in fp16: keep it in fp32 or bf16.",
)

FAMILIES: dict[str, ModelFamily] = {f.id: f for f in (SD15, SD2, SD2_V, SDXL)}
_ALIASES = {"sd1": "sd15", "sd1.5": "sd15", "sd_v1": "sd15", "sd21": "sd2", "sd2.1": "sd2", "sd2v": "sd2-v", "sd-xl": "sdxl"}


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
    ("double_blocks.", "a Flux transformer (Flux support is a later addition)"),
    ("model.diffusion_model.double_blocks.", "a Flux transformer (Flux support is a later addition)"),
    ("model.diffusion_model.joint_blocks.", "an SD3 transformer (not supported)"),
    ("joint_blocks.", "an SD3 transformer (not supported)"),
    ("lora_unet_", "a LoRA in kohya layout, not a base model"),
    ("lora_te", "a LoRA in kohya layout, not a base model"),
)

_V_PRED_ARCHITECTURE_HINTS = ("768-v", "-v-", "v-prediction", "v_prediction")


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
