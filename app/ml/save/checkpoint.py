"""Full-model saves: one ``.safetensors`` file (SD: the original A1111/Civitai layout; Flux: the BFL transformer,
as ``flux1-dev.safetensors``), or a diffusers folder.

Both take an optional adapter set to merge at a strength: merged weights are computed into new
tensors (``merged_state_dicts``), so the cached base model is never modified. The single file uses
the inverse of diffusers' single-file conversion from ``app.ml.models.original_layout`` (shared with
the model loader's tests), so what we write loads back through ``load_model`` and diffusers'
``from_single_file``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from app.ml.adapters import merged_state_dicts

from app.atomic import atomic_file, atomic_folder
from .lora import parse_save_dtype
from .metadata import checkpoint_metadata


def _state_dicts(bundle, adapters, strength) -> dict[str, dict[str, torch.Tensor]]:
    sds = merged_state_dicts(bundle, adapters, strength)
    sds["vae"] = dict(bundle.vae.state_dict())
    return sds


def _prepare(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """CPU, contiguous, cast. A tensor tied to an earlier one (T5's embed_tokens is its shared embedding)
    is written once: safetensors refuses shared memory, and loading ties it again."""
    out = {}
    seen: set[tuple[int, tuple]] = set()
    for k, v in sd.items():
        v = v.detach()
        tie = (v.data_ptr(), tuple(v.shape))
        if v.numel() and tie in seen:
            continue
        seen.add(tie)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.to("cpu").contiguous()
    return out


def save_single_file(
    bundle,
    path: "str | os.PathLike",
    *,
    adapters=None,
    strength: float = 1.0,
    dtype: "str | torch.dtype | None" = None,
    recipe: Any = None,
    step: int | None = None,
    epoch: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the (optionally adapter-merged) model as one original-layout ``.safetensors``; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    dt = parse_save_dtype(dtype) if dtype is not None else None
    sds = _state_dicts(bundle, adapters, strength)
    tensors = _prepare(bundle.family.single_file_state(bundle, sds), dt)  # SD: original layout; Flux: BFL transformer
    with atomic_file(path, overwrite, size_hint=sum(t.numel() * t.element_size() for t in tensors.values())) as target:
        meta = checkpoint_metadata(bundle, title=target.final.stem, recipe=recipe, step=step, epoch=epoch)
        save_file(tensors, str(target.tmp), metadata=meta)
    return target.final


def save_diffusers(
    bundle,
    folder: "str | os.PathLike",
    *,
    adapters=None,
    strength: float = 1.0,
    dtype: "str | torch.dtype | None" = None,
    recipe: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder*/``, tokenizers,
    ``scheduler/``) that ``load_model`` and ``DiffusionPipeline.from_pretrained`` read; returns its path."""
    import diffusers

    dt = parse_save_dtype(dtype) if dtype is not None else None
    sds = _state_dicts(bundle, adapters, strength)
    fam = bundle.family
    size = sum(t.numel() * (dt.itemsize if dt is not None and t.is_floating_point() else t.element_size())
               for sd in sds.values() for t in sd.values())
    with atomic_folder(folder, overwrite, size_hint=size) as target:
        root = target.tmp
        index: dict[str, Any] = {"_class_name": fam.pipeline_class, "_diffusers_version": diffusers.__version__}
        for name, model in ((fam.denoiser, bundle.denoiser), ("vae", bundle.vae)):
            (root / name).mkdir()
            model.save_config(str(root / name))
            save_file(_prepare(sds[name], dt), str(root / name / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
            index[name] = ["diffusers", type(model).__name__]
        for spec, te, tok in zip(fam.text_encoders, bundle.text_encoders, bundle.tokenizers):
            (root / spec.name).mkdir()
            te.config.save_pretrained(str(root / spec.name))
            save_file(_prepare(sds[spec.name], dt), str(root / spec.name / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(str(root / spec.tokenizer))
            index[spec.name] = ["transformers", type(te).__name__]
            index[spec.tokenizer] = ["transformers", type(tok).__name__]
        sched = {k: v for k, v in dict(bundle.scheduler_config).items() if not (fam.objective == "flow" and k == "prediction_type")}
        sched.setdefault("_class_name", fam.scheduler_class)
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True))
        index["scheduler"] = ["diffusers", sched["_class_name"]]
        index.update(fam.model_index_extras())
        (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        meta = checkpoint_metadata(bundle, title=target.final.name, recipe=recipe)
        (root / "nodetrainer.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return target.final
