"""``AdapterConfig``: what a LoRAInject node asks for, as plain data (no torch).

The config is part of the recipe and of the executor's cache key, so it is a frozen dataclass of
JSON-friendly values. ``alpha`` is the *real* alpha the user typed: the applied scale is
``alpha / rank`` and the saved ``.alpha`` tensor holds this same number, which is what kohya,
A1111 and ComfyUI expect (diffusers' own kohya exporter writes alpha = rank, which silently changes
the strength of a LoRA trained with another alpha).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

ALGORITHMS = ("lora", "locon", "loha", "lokr", "dora")
PRESETS = ("none", "attn-only", "attn-mlp", "full", "custom", "single-blocks")  # single-blocks: Flux only


class AdapterError(ValueError):
    """A user-facing adapter problem: the message says which setting or file and what to do."""


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of one adapter network.

    algorithm: ``lora`` (Linear and 1x1 conv layers, kohya "LierLa"), ``locon`` (LoRA that also
        adapts 3x3 convs, with ``conv_rank``/``conv_alpha``), ``loha`` (Hadamard product of two
        low-rank pairs), ``lokr`` (Kronecker product; ``factor`` splits the dimensions), ``dora``
        (LoRA/LoCon plus a learned per-output-channel magnitude ``dora_scale``).
    rank, alpha: the scale applied is ``alpha / rank``. conv_rank/conv_alpha default to rank/alpha.
    dropout: on the low-rank activations (LoRA family) or on the delta weight rows (LoHa/LoKr).
    rank_dropout: drops whole rank channels (LoRA) / output rows of the delta (LoHa/LoKr).
    module_dropout: skips a whole adapted layer for a training step.
    targets: preset per component - ``unet``, ``text_encoder``, ``text_encoder_2`` - one of
        ``none``, ``attn-only``, ``attn-mlp``, ``full`` or ``custom`` (then ``custom[component]``
        lists module names or regular expressions).
    factor: LoKr's dimension split (-1 = as square as possible, like LyCORIS).
    seed: initialisation seed, so a recipe re-creates identical starting weights.
    """

    algorithm: str = "lora"
    rank: int = 16
    alpha: float = 1.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    factor: int = -1
    targets: Mapping[str, str] = field(default_factory=lambda: {"unet": "attn-mlp", "text_encoder": "none", "text_encoder_2": "none"})
    custom: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise AdapterError(f"unknown adapter algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if int(self.rank) < 1:
            raise AdapterError(f"rank must be at least 1, got {self.rank}")
        if self.conv_rank is not None and int(self.conv_rank) < 1:
            raise AdapterError(f"conv_rank must be at least 1, got {self.conv_rank}")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            v = float(getattr(self, name))
            if not 0.0 <= v < 1.0:
                raise AdapterError(f"{name} must be in [0, 1), got {v}")
        targets = dict(self.targets)
        for comp, preset in targets.items():
            if preset not in PRESETS:
                raise AdapterError(f"unknown layer preset {preset!r} for {comp}; choose one of {', '.join(PRESETS)}")
            if preset == "custom" and not self.custom.get(comp):
                raise AdapterError(f"preset 'custom' for {comp} needs a list of module names or regexes in custom[{comp!r}]")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "custom", {k: tuple(v) for k, v in dict(self.custom).items()})

    @property
    def effective_conv_rank(self) -> int:
        return int(self.conv_rank if self.conv_rank is not None else self.rank)

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.conv_alpha if self.conv_alpha is not None else self.alpha)

    @property
    def adapts_3x3_convs(self) -> bool:
        """Plain LoRA stays on Linear/1x1 layers (kohya's default); the other algorithms do convs too."""
        return self.algorithm != "lora"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = dict(self.targets)
        d["custom"] = {k: list(v) for k, v in self.custom.items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterConfig":
        return cls(**dict(data))
