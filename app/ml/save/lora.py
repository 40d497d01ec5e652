"""Write an ``AdapterSet`` as a LoRA/LyCORIS ``.safetensors`` file other tools load.

kohya layout is the default for SD/SDXL because A1111, Forge, ComfyUI and diffusers all read it;
``peft`` writes what ``pipe.load_lora_weights`` loads natively (alpha in diffusers' adapter
metadata); ``comfyui`` writes ComfyUI's own ``diffusion_model.`` names. See
``app/ml/adapters/naming.py`` for the key names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file

from app.ml.adapters import AdapterSet, adapter_tensors, peft_metadata
from app.ml.adapters.io import PEFT_METADATA_KEY

from app.atomic import atomic_file
from .metadata import file_hashes, lora_metadata

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_save_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in SAVE_DTYPES.values():
            raise ValueError(f"cannot save in {dtype}; use fp32, fp16 or bf16")
        return dtype
    try:
        return SAVE_DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown save dtype {dtype!r}; use fp32, fp16 or bf16") from None


def save_adapter(
    adapters: AdapterSet,
    path: "str | os.PathLike",
    *,
    layout: str = "kohya",
    dtype: "str | torch.dtype" = "fp16",
    recipe: Any = None,
    step: int | None = None,
    epoch: int | None = None,
    base_model_name: str = "",
    overwrite: bool = False,
    unet_naming: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    embeddings: "Sequence | None" = None,
) -> Path:
    """Save ``adapters`` and return the path written (``_1``, ``_2``... appended unless ``overwrite``).

    ``dtype`` fp16 is the community default (small files); ``.alpha`` tensors are stored in the same
    dtype as kohya does. ``unet_naming`` ("diffusers"/"sgm") overrides kohya's per-family choice.
    ``embeddings``: textual-inversion embeddings bundled into the file as ``bundle_emb.<token>.…``
    (OneTrainer's "bundle embeddings", read by A1111's LoRA loader; see ``app/ml/embeddings/files.py``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    dt = parse_save_dtype(dtype)
    if adapters.family is not None:  # the family owns its key maps (Flux: fused BFL blocks)
        raw, layout_meta = adapters.family.adapter_file(adapters, layout, unet_naming)
    else:
        raw = adapter_tensors(adapters, layout, unet_naming=unet_naming)
        layout_meta = {PEFT_METADATA_KEY: json.dumps(peft_metadata(adapters), indent=2, sort_keys=True)} if layout == "peft" else {}
    if embeddings:
        from app.ml.embeddings import bundled_tensors

        raw = {**raw, **bundled_tensors(embeddings)}
    tensors = {k: v.to("cpu", dt).contiguous() if k.startswith("bundle_emb.") else v.to(dt).contiguous()
               for k, v in raw.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_file(path, overwrite, size_hint=size) as target:
        meta = lora_metadata(
            adapters, layout=layout, title=target.final.stem, recipe=recipe, step=step, epoch=epoch,
            base_model_name=base_model_name, extra=extra_metadata,
        )
        meta["nodetrainer_dtype"] = {v: k for k, v in SAVE_DTYPES.items()}[dt]
        meta.update(layout_meta)
        if embeddings:
            meta["nodetrainer_bundled_embeddings"] = json.dumps([e.token for e in embeddings])
        meta.update(file_hashes(tensors, meta))
        save_file(tensors, str(target.tmp), metadata=meta)
    return target.final
