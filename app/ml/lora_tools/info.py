"""What a LoRA file is, read from its names, shapes and metadata alone (no model needed).

Shown by LoadLoRA before anything is applied: the algorithm, rank and alpha a user would otherwise
open the file in a metadata viewer for, the base model it was made for (so a mismatch can be named:
"this is an SDXL LoRA; the model is SD 1.5"), its trigger words and whether it carries the recipe
that made it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

FAMILY_NAMES = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sd2-v": "SD 2.x 768-v", "sdxl": "SDXL", "flux": "Flux",
                "flux-dev": "Flux", "flux-schnell": "Flux"}


def _family_from_metadata(meta: dict[str, str]) -> str:
    fam = meta.get("nodetrainer_base_family", "")
    if fam:
        return fam
    version = meta.get("ss_base_model_version", "")
    arch = meta.get("modelspec.architecture", "")
    for text in (version, arch):
        if "sdxl" in text or "stable-diffusion-xl" in text:
            return "sdxl"
        if "flux" in text:
            return "flux"
        if text.startswith("sd_v2") or "stable-diffusion-v2" in text:
            return "sd2-v" if ("_v" in text[5:] or "768-v" in text) else "sd2"
        if text.startswith("sd_v1") or "stable-diffusion-v1" in text:
            return "sd15"
    return ""


def _family_from_keys(shapes: dict[str, tuple]) -> str:
    keys = list(shapes)
    if any(m in k for k in keys for m in ("double_blocks", "single_blocks", "transformer.", "single_transformer_blocks")):
        return "flux"
    if any(m in k for k in keys for m in ("lora_te2_", "text_encoder_2.", "input_blocks_", "lora_unet_input_blocks",
                                          "diffusion_model.input_blocks.4.1.transformer_blocks.1")):
        return "sdxl"
    # SD 1.x and 2.x differ in the text encoder's width (768 / 1024) and the UNet's cross-attention input.
    for k, shape in shapes.items():
        if ("attn2_to_k" in k or "attn2.to_k" in k) and ("lora_down" in k or "lora_A" in k) and len(shape) == 2:
            return "sd2" if shape[1] == 1024 else "sd15"
        if ("q_proj" in k) and ("lora_down" in k or "lora_A" in k) and len(shape) == 2:
            return "sd2" if shape[1] == 1024 else "sd15"
    return "sd15" if keys else ""


def _algorithm(shapes: dict[str, tuple]) -> str:
    keys = list(shapes)
    if any(k.endswith("dora_scale") or "lora_magnitude_vector" in k for k in keys):
        return "dora"
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(".lokr_" in k for k in keys):
        return "lokr"
    conv = any(k.endswith((".lora_down.weight", ".lora_A.weight")) and len(s) == 4 and s[2:] != (1, 1)
               for k, s in shapes.items())
    return "locon" if conv else "lora"


def _layout(keys: list[str]) -> str:
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    return "peft"


def lora_file_info(path: "str | os.PathLike") -> dict[str, Any]:
    """Facts about a LoRA ``.safetensors`` file from its header (tensors are not loaded)."""
    from safetensors import safe_open

    from app.ml.adapters import AdapterError

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path.name}: LoRA tools read .safetensors files; convert it first")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            alphas = [float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")]
    except Exception as e:  # noqa: BLE001 - a damaged header is reported with the file name
        raise AdapterError(f"{path.name}: not a readable safetensors file ({e})") from None
    keys = list(shapes)
    ranks = Counter(s[0] for k, s in shapes.items() if k.endswith((".lora_down.weight", ".lora_A.weight")))
    ranks.update(s[0] for k, s in shapes.items() if k.endswith(".hada_w1_b"))
    family = _family_from_metadata(meta) or _family_from_keys(shapes)
    triggers = meta.get("modelspec.trigger_phrase", "")
    if not triggers and meta.get("ss_tag_frequency"):
        try:
            freq: Counter = Counter()
            for tags in json.loads(meta["ss_tag_frequency"]).values():
                freq.update({t: int(n) for t, n in tags.items()})
            triggers = ", ".join(t for t, _ in freq.most_common(3))
        except (ValueError, AttributeError, TypeError):
            pass
    alpha = Counter(alphas).most_common(1)[0][0] if alphas else meta.get("ss_network_alpha", "")
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    return {
        "file": path.name,
        "layout": _layout(keys),
        "algorithm": _algorithm(shapes),
        "rank": int(ranks.most_common(1)[0][0]) if ranks else meta.get("ss_network_dim", ""),
        "alpha": alpha,
        "family": family,
        "base_model": FAMILY_NAMES.get(family, family),
        "base_model_name": meta.get("ss_sd_model_name", ""),
        "trigger_words": triggers,
        "title": meta.get("modelspec.title", meta.get("ss_output_name", "")),
        "modules": len(modules),
        "has_recipe": bool(meta.get("nodetrainer_recipe")),
        "metadata": meta,
    }
