"""Activation memory of a denoiser as data: what one training step needs per token, measured once.

A family module carries ``ActivationProfile``s for the denoisers it knows (``sd.py``: SD 1.5 and the
tiny SD models; ``sdxl.py``; ``flux.py``), measured on this machine's CPU by
``tests/bench/measure_coefficients.py`` (the peak growth of a forward + backward per token, frozen
weights, without and with gradient checkpointing). The memory planner
(``app/ml/memory/recipe_plan.py``) scales them to a recipe's buckets, batch and depth; no table per
GPU: weights, adapters and optimizer state are counted, only activations are measured.

A step's activation peak, per sample, is ``tokens x (base + blocks x per_block)`` for each kind of
block (Flux: double- and single-stream; a UNet is one ``base`` for the whole model), plus
``adapter_factor`` x the inputs of the adapted layers (a LoRA keeps its layer's input for its own
gradient: a frozen layer alone does not). Attention scores do not enter: PyTorch's scaled dot-product
attention (flash / memory-efficient on GPU, the flash kernel on CPU) never holds them, and the
measurements at three sizes show the per-token cost flat (the script prints the check).

Importable without torch (validation and the editor read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Compute bytes per activation element of each TrainLoop train_dtype (autocast keeps norms and
# softmax in fp32: measured profiles already include that mix at their own dtype).
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ActivationProfile:
    """Peak bytes of one training step's activations per token (per latent pixel for a UNet, per
    image + text token for a transformer), batch 1, measured in ``dtype``."""

    name: str  # what it was measured on: "sd15", "tiny-sd", "flux-dev"
    signature: tuple  # the denoiser config values that decide it (see ``signature``)
    dtype: str  # compute dtype of the measurement: "fp32" | "bf16"
    base: float  # bytes per token of the whole denoiser, blocks below not counted
    ckpt_base: float  # the same with gradient checkpointing (includes one block's recompute)
    per_block: tuple[tuple[str, float, float], ...] = ()  # (block list, bytes per token, with checkpointing)
    adapter_factor: float = 1.0  # step peak bytes per byte of adapted-layer input
    first_step: float = 1.0  # a run's first step over later ones (allocator growth, kernel workspaces)
    width: float = 0.0  # the denoiser's width (UNet: first block's channels; Flux: heads x head size)
    measured: str = ""  # where and how (machine, sizes), for the record

    def per_token(self, blocks: Mapping[str, int], checkpointing: bool, dtype: str) -> float:
        """Bytes per token of a step through ``blocks`` (block list name -> count) in ``dtype``."""
        total = self.ckpt_base if checkpointing else self.base
        for name, full, ckpt in self.per_block:
            total += blocks.get(name, 0) * (ckpt if checkpointing else full)
        return total * self.first_step * DTYPE_BYTES.get(dtype, 4) / DTYPE_BYTES[self.dtype]


# The config values that decide activation size per token, per denoiser class (depth of a
# transformer excluded: it is counted per block).
SIGNATURE_KEYS = {
    "UNet2DConditionModel": ("block_out_channels", "layers_per_block", "down_block_types", "transformer_layers_per_block",
                             "attention_head_dim", "cross_attention_dim", "use_linear_projection"),
    "FluxTransformer2DModel": ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "in_channels"),
}


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def signature(class_name: str, config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> tuple:
    """The profile key of a denoiser config (``defaults``: the class's defaults for keys the file omits)."""
    keys = SIGNATURE_KEYS.get(class_name, ())
    defaults = defaults or {}
    return (class_name,) + tuple(_freeze(config.get(k, defaults.get(k))) for k in keys)


@dataclass
class ProfileMatch:
    profile: ActivationProfile
    exact: bool
    scale: float = 1.0  # applied to an inexact match (width ratio)
    note: str = ""


def width_of(class_name: str, config: Mapping[str, Any]) -> float:
    """The width a profile scales with when the architecture was not measured."""
    if class_name == "FluxTransformer2DModel":
        return float(config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128))
    channels = config.get("block_out_channels") or (320,)
    return float(channels[0])


def find_profile(profiles: Iterable[ActivationProfile], sig: tuple, width: float = 0.0) -> ProfileMatch | None:
    """The profile measured on this architecture; else the nearest of the same class, scaled by the
    width ratio (activations grow with width at a fixed token count), with a note that says so."""
    profiles = [p for p in profiles if p.signature[:1] == sig[:1]]
    for p in profiles:
        if p.signature == sig:
            return ProfileMatch(p, True)
    if not profiles:
        return None
    best = min(profiles, key=lambda p: abs(p.width - width))
    scale = width / best.width if width and best.width else 1.0
    return ProfileMatch(best, False, scale,
                        f"activations not measured for this architecture: {best.name}'s, scaled by width x{scale:.2f}")


def all_profiles() -> tuple[ActivationProfile, ...]:
    """Every family module's profiles (a new family adds its module here)."""
    from . import flux, sd, sdxl

    return tuple(p for mod in (sd, sdxl, flux) for p in getattr(mod, "ACTIVATION_PROFILES", ()))


__all__ = ["ActivationProfile", "DTYPE_BYTES", "ProfileMatch", "all_profiles", "find_profile", "signature", "width_of"]
