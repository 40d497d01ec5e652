"""The family interface: what every model family states as data and does as code.

A family module (``sd.py``, ``sdxl.py``, ``flux.py``) owns everything that differs between base
models: its components (``denoiser`` names the one that denoises: the UNet or the transformer),
prompt encoding, the conditioning and the call of its denoiser, its training objective and its
sampling. The trainer, nodes and savers call these methods instead of branching on family ids, so
a new family is a new module, not edits scattered over the code base.

Facts are plain dataclass fields; behaviour is methods that import torch lazily, so this package
stays importable by the GUI and recipe validation without torch (a test enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence


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
    embedding_key: str = "emb_params"  # this encoder's vectors in an embedding file (A1111/ComfyUI/OneTrainer names)


PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ModelFamily:
    """What a trainer needs to know about one base-model family (real, full-size values).

    Subclasses implement the behaviour methods below; the fields are facts other code reads.
    """

    id: str
    display_name: str
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel
    vae_scaling_factor: float  # multiply VAE latents by this before the denoiser sees them
    bucket_quantization: int  # bucket sides are multiples of this (pixels)
    default_resolution: int
    prediction_type: str  # "epsilon" | "v_prediction" | "flow" (rectified flow: velocity noise - x0)
    text_encoders: tuple[TextEncoderSpec, ...]
    uses_time_ids: bool  # SDXL micro-conditioning (original size, crop, target size)
    kohya_base_model_version: str  # ss_base_model_version
    kohya_v2: bool  # ss_v2
    config_dir: str  # folder name under app/ml/models/configs/
    pipeline_class: str  # diffusers pipeline class name written in model_index.json
    vae_shift_factor: float | None = None
    unet_cross_attention_dim: int = 0
    notes: str = ""
    denoiser: str = "unet"  # component name of the denoiser: "unet" | "transformer"
    # the denoiser's block lists in the order a forward pass runs them: what TrainLoop's blocks_to_swap
    # streams from RAM (attribute names of ModuleLists; the UNet's mid block stays resident)
    swap_blocks: tuple[str, ...] = ("down_blocks", "up_blocks")
    objective: str = "noise"  # "noise" (DDPM epsilon / v) | "flow" (rectified flow matching)
    pixel_multiple: int = 8  # image sides must be multiples of this (VAE factor, times patching)
    sample_steps: int = 30  # Sample's steps when its steps param is 0 (the model's default)
    sample_options: tuple[str, ...] = ()  # extra Sample params this family's sample_latents takes (Flux: true_cfg)
    modelspec_architecture: str = ""  # modelspec.architecture as kohya writes it; "" = the SD table in save/metadata.py
    modelspec_implementation: str = ""
    kohya_network_module: str = "networks.lora"  # ss_network_module of a plain LoRA
    # Linear layers LoadModel's quantization leaves in full precision, as fnmatch patterns on
    # "<component>.<module name>": small input/output projections and embedders whose error every
    # later layer inherits (the layers kohya/musubi's fp8_base exclude). Norms, embeddings and convs
    # are never quantized (only nn.Linear is).
    quant_keep: tuple[str, ...] = ("unet.time_embedding.*", "unet.add_embedding.*", "text_encoder*.text_projection")

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
        """Width of the prompt embeddings the denoiser cross-attends to."""
        return sum(te.hidden_size for te in self.text_encoders)

    def with_prediction_type(self, prediction_type: str) -> "ModelFamily":
        """The same family trained with another objective (e.g. a v-prediction SD1.5 fine-tune)."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == self.prediction_type:
            return self
        return replace(self, prediction_type=prediction_type)

    # ------------------------------------------------------------------ behaviour (subclasses)

    def check_size(self, width: int, height: int, where: str) -> None:
        """Refuse image sizes this family cannot denoise (ValueError naming ``where``)."""
        q = self.pixel_multiple
        if width % q or height % q or width <= 0 or height <= 0:
            raise ValueError(f"{where}: width and height must be positive multiples of {q} for {self.display_name}, "
                             f"got {width}x{height}")

    def swappable_blocks(self, denoiser) -> list:
        """The denoiser's blocks that block swap may stream, in forward order (``swap_blocks``)."""
        return [block for name in self.swap_blocks for block in getattr(denoiser, name, None) or ()]

    def check_components(self, denoiser, text_encoders, source: str) -> None:
        """Refuse components that do not belong together (a ``ModelLoadError`` naming ``source``)."""
        raise NotImplementedError

    def set_text_length(self, tokenizers, length: int, source: str) -> None:
        """Prompt tokens the text encoder(s) read (Flux: T5's padded length). CLIP families read 77-token
        pieces whatever is asked (TrainLoop's max_tokens sets how many), so they keep theirs."""

    def text_key(self, bundle) -> str:
        """What besides the encoders and tokenizers decides the prompt embeddings (part of the text identity)."""
        return ""

    def encode_prompts(self, bundle, prompts: Sequence[str], *, clip_skip: int = 1, with_grad: bool = False,
                       chunks: int = 1) -> dict[str, Any]:
        """Prompt embeddings as this family's denoiser consumes them (float32 tensors by name)."""
        raise NotImplementedError

    def conditioning(self, bundle, text: Mapping[str, Any], *, pixel_size: tuple[int, int], batch: int,
                     device, original_sizes=None, crops_top_left=None, guidance: float | None = None) -> dict[str, Any]:
        """The keyword inputs of one denoiser call, from encoded prompts (``text``) and the image size."""
        raise NotImplementedError

    def predict(self, denoiser, noisy, timesteps, cond: Mapping[str, Any]):
        """One denoiser call on latents shaped like the VAE's (B x C x h x w); returns the same shape."""
        raise NotImplementedError

    def make_objective(self, bundle, settings):
        """The training objective for this family from TrainLoop settings (see app/ml/train/objective.py)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters (LoRA & co.)

    lora_presets: tuple[str, ...] = ("attn-mlp", "attn-only", "full", "custom", "none")

    def adapter_targets(self, model, component: str, preset: str, custom, allow_3x3: bool) -> list[str]:
        """Module names of one component that a LoRAInject layer preset selects."""
        from app.ml.adapters.targets import select_targets

        return select_targets(model, component, preset, custom, allow_3x3)

    def adapter_file(self, aset, layout: str, unet_naming: str | None = None) -> tuple[dict, dict[str, str]]:
        """An adapter's file tensors in ``layout`` and the metadata that layout needs (kohya, peft, comfyui)."""
        import json

        from app.ml.adapters.io import PEFT_METADATA_KEY, adapter_tensors, peft_metadata

        tensors = adapter_tensors(aset, layout, unet_naming=unet_naming)
        meta = {PEFT_METADATA_KEY: json.dumps(peft_metadata(aset), indent=2, sort_keys=True)} if layout == "peft" else {}
        return tensors, meta

    def read_adapter_tensors(self, tensors: Mapping[str, Any], metadata: Mapping[str, str], where: str) -> Mapping[str, Any]:
        """A LoRA file's tensors in names the generic reader resolves (``app/ml/adapters/io.py``);
        refuses, by name, LoRAs made for a family of another architecture."""
        from .detection import foreign_lora_family

        from app.ml.adapters.config import AdapterError

        other = foreign_lora_family(tensors, self)
        if other:
            raise AdapterError(f"{where}: this is a LoRA for {other}, not for {self.display_name}; "
                             f"load it with a {other} model.")
        return tensors

    def lora_file_warnings(self, path, metadata: Mapping[str, str]) -> list[str]:
        """Notes LoadLoRA shows for a LoRA file that loads but was made for a sibling model (Flux dev on
        schnell); none by default."""
        return []

    # ------------------------------------------------------------------ full-model files

    def single_file_state(self, bundle, state_dicts: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors of a one-file save (merged per-component state dicts in, file keys out)."""
        from app.ml.models.original_layout import to_original_state_dict

        tes = [state_dicts[spec.name] for spec in self.text_encoders]
        return to_original_state_dict(self.id, state_dicts["unet"], bundle.denoiser.config, state_dicts["vae"],
                                      bundle.vae.config, tes)

    def model_index_extras(self) -> dict[str, Any]:
        """Pipeline arguments a diffusers folder's ``model_index.json`` carries besides the components."""
        return {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

    scheduler_class: str = "PNDMScheduler"  # written in a diffusers folder when the config names none

    def sample_text(self, bundle, *, prompt: str, negative_prompt: str, cfg: float, sampler: str, clip_skip: int,
                    device) -> dict[str, Any]:
        """The sampling pipeline's text inputs as embeddings on ``device`` (only the text encoders are there)."""
        raise NotImplementedError

    def sample_latents(self, bundle, *, text: Mapping[str, Any], negative_prompt: str, width: int, height: int,
                       steps: int, cfg: float, seed: int, sampler: str, check_cancel=None) -> tuple[Any, str]:
        """Denoise one image from noise and ``sample_text``'s embeddings (only the denoiser is on the device);
        returns ``(latents 1 x C x h x w, implementation name)``."""
        raise NotImplementedError


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
    "t5-xxl": HubTokenizer(  # Flux's second text encoder
        "google/t5-v1_1-xxl", ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
        "T5 v1.1 XXL", essential=("spiece.model",),
    ),
}
