"""Which layers an adapter wraps: the presets users know from kohya/LyCORIS/OneTrainer.

Presets are defined on the diffusers/transformers module names, which are the same in the tiny
test models and the full-size ones:

* ``attn-only``  - attention projections (UNet ``attn1``/``attn2`` ``to_q/k/v/out.0``; CLIP
  ``self_attn.q/k/v/out_proj``). The safest, most portable choice.
* ``attn-mlp``   - every Linear/1x1 layer inside the UNet's transformer blocks (attention,
  feed-forward, ``proj_in``/``proj_out``) and CLIP's attention + MLP: kohya's default set.
* ``full``       - attn-mlp plus the ResNet, sampler, time-embedding and in/out convolutions
  (3x3 convs only when the algorithm adapts them, i.e. not plain ``lora``). Text encoders have
  nothing more than attn-mlp.
* ``custom``     - exact module names or regular expressions (``re.search``) over module names.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from .config import AdapterError

_UNET_ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TE_ATTN = re.compile(r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TE_MLP = re.compile(r"(^|\.)mlp\.(fc1|fc2)$")


def adaptable_layers(model: nn.Module, allow_3x3: bool = True) -> dict[str, nn.Module]:
    """Linear and Conv2d layers (3x3 ones only if ``allow_3x3``), by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m
        elif isinstance(m, nn.Conv2d) and (allow_3x3 or tuple(m.kernel_size) == (1, 1)):
            out[name] = m
    return out


def _is_text_encoder(component: str) -> bool:
    return component.startswith("text_encoder")


def select_targets(
    model: nn.Module,
    component: str,
    preset: str,
    custom: Iterable[str] = (),
    allow_3x3: bool = True,
) -> list[str]:
    """Module names of ``model`` (one component) that ``preset`` selects, in model order."""
    if preset == "none":
        return []
    layers = adaptable_layers(model, allow_3x3)
    names = list(layers)
    if preset == "custom":
        patterns = list(custom)
        chosen: list[str] = []
        for pat in patterns:
            if pat in layers:
                hits = [pat]
            else:
                try:
                    rx = re.compile(pat)
                except re.error as e:
                    raise AdapterError(f"custom layer pattern {pat!r} for {component} is not a valid regex: {e}") from None
                hits = [n for n in names if rx.search(n)]
            if not hits:
                sample = ", ".join(names[:5])
                raise AdapterError(
                    f"custom layer pattern {pat!r} matches no Linear/Conv2d layer of the {component} "
                    f"(names look like: {sample}, ...)"
                )
            chosen.extend(h for h in hits if h not in chosen)
        return [n for n in names if n in chosen]

    if _is_text_encoder(component):
        if preset == "attn-only":
            return [n for n in names if _TE_ATTN.search(n)]
        return [n for n in names if _TE_ATTN.search(n) or _TE_MLP.search(n)]

    in_transformer = [n for n in names if ".attentions." in n and not n.startswith("encoder")]
    if preset == "attn-only":
        return [n for n in in_transformer if _UNET_ATTN.search(n)]
    if preset == "attn-mlp":
        return in_transformer
    if preset == "full":
        return names
    if preset == "single-blocks":
        raise AdapterError(f"layer preset 'single-blocks' is for Flux's transformer; the {component} has no single-stream "
                           "blocks (choose attn-only, attn-mlp, full or custom)")
    raise AdapterError(f"unknown layer preset {preset!r} for {component}")
