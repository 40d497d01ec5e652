"""Adapter key names in the layouts other tools read, and their inverse.

* kohya (A1111, ComfyUI, Forge, diffusers' converter): ``lora_unet_<path with _>`` and
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + ``text_model_encoder_layers_…``. The UNet path is
  the diffusers module path for SD1.x/2.x (kohya trains those on a diffusers-named UNet) and the
  original "sgm" path (``input_blocks_4_1_…``) for SDXL, as kohya's SDXL trainer writes. Text-encoder
  keys always keep the ``text_model`` level, even though transformers 5's ``CLIPTextModel`` no longer
  has it in its module names.
* diffusers/PEFT: ``unet.<module path>`` / ``text_encoder.text_model.<…>`` / ``text_encoder_2.…``
  with ``.lora_A.weight`` / ``.lora_B.weight`` (what ``pipe.load_lora_weights`` expects).
* ComfyUI native: ``diffusion_model.<original UNet path>`` (ComfyUI's own state-dict names); text
  encoders in kohya names, which ComfyUI maps to its CLIP models.
"""

from __future__ import annotations

from typing import Mapping

LAYOUTS = ("kohya", "peft", "comfyui")


def te_full_name(name: str) -> str:
    """The module path with the ``text_model.`` level that transformers 4 had and kohya keeps."""
    if name.startswith("text_model.") or name.startswith("text_projection"):
        return name
    return "text_model." + name


def te_kohya_prefix(family, component: str) -> str:
    for spec in family.text_encoders:
        if spec.name == component:
            return spec.kohya_prefix
    raise KeyError(f"{family.display_name} has no {component}")


def unet_original_path(name: str, unet_config: Mapping) -> str:
    from app.ml.models.original_layout import unet_key_to_original

    return unet_key_to_original(name + ".weight", unet_config)[: -len(".weight")]


def default_unet_naming(family) -> str:
    """kohya's own choice: sgm names for SDXL, diffusers names for SD1.x/2.x."""
    return "sgm" if family.id == "sdxl" else "diffusers"


def module_key(component: str, name: str, layout: str, family, unet_config: Mapping, unet_naming: str | None = None) -> str:
    """The key prefix (before ``.lora_down.weight`` etc.) of one adapted module in ``layout``."""
    if layout == "peft":
        return f"{component}.{te_full_name(name) if component != 'unet' else name}"
    if component == "unet":
        if layout == "comfyui":
            return "diffusion_model." + unet_original_path(name, unet_config)
        naming = unet_naming or default_unet_naming(family)
        path = unet_original_path(name, unet_config) if naming == "sgm" else name
        return "lora_unet_" + path.replace(".", "_")
    return te_kohya_prefix(family, component) + "_" + te_full_name(name).replace(".", "_")


def alias_table(bundle_components: Mapping, family, unet_config: Mapping) -> dict[str, tuple[str, str]]:
    """Every key prefix we can read -> (component, module name), built from the actual model.

    Covers all three layouts, both kohya UNet namings, ``lora_te_`` for single-encoder families
    and ``lora_te1_`` as written by some SD1.5 tools, and peft keys with or without ``text_model.``.
    """
    import torch.nn as nn

    table: dict[str, tuple[str, str]] = {}
    for component, model in bundle_components.items():
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            target = (component, name)
            if component == family.denoiser and component != "unet":
                table[f"{component}.{name}"] = target  # the family's own reader maps its file layouts to these
            elif component == "unet":
                table[f"unet.{name}"] = target
                table["lora_unet_" + name.replace(".", "_")] = target
                try:
                    orig = unet_original_path(name, unet_config)
                except (KeyError, ValueError, IndexError):
                    orig = None
                if orig:
                    table["lora_unet_" + orig.replace(".", "_")] = target
                    table["diffusion_model." + orig] = target
            else:
                full = te_full_name(name)
                short = full.removeprefix("text_model.")
                table[f"{component}.{full}"] = target
                table[f"{component}.{short}"] = target
                prefixes = {te_kohya_prefix(family, component)}
                if len(family.text_encoders) == 1:
                    prefixes |= {"lora_te", "lora_te1"}
                for p in prefixes:
                    table[p + "_" + full.replace(".", "_")] = target
    return table
