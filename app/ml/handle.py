"""What flows on MODEL sockets: a shared base model plus the adapters patched into it.

LoadModel makes a handle with no adapters; LoRAInject returns a *new* handle with one more
adapter and leaves the base untouched; the adapters are attached only while a consumer runs
(sampling, training) and removed after — ComfyUI's ModelPatcher lesson. A handle is immutable,
so the executor can cache and share it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field


@dataclass(frozen=True, eq=False)
class ModelHandle:
    base: object  # app.ml.models.ModelBundle
    adapters: tuple = ()  # AdapterSet, oldest first; the last one is what TrainLoop trains
    strengths: tuple = ()  # per adapter; 1.0 when missing
    info: dict = field(default_factory=dict)  # e.g. the trained steps, for metadata

    def __freeze__(self):
        return self

    def __contents__(self):
        """What this handle holds (see NodeContext.exclusive)."""
        return (self.base, *self.adapters)

    @property
    def family(self):
        return self.base.family

    def with_adapter(self, adapter, strength: float = 1.0) -> "ModelHandle":
        return ModelHandle(self.base, self.adapters + (adapter,), self._strengths() + (strength,), dict(self.info))

    def _strengths(self) -> tuple:
        return tuple(self.strengths) + (1.0,) * (len(self.adapters) - len(self.strengths))

    def adapter_pairs(self, strength: float = 1.0) -> list:
        """(adapter, strength) pairs for the sampling/saving functions; [] without adapters."""
        return [(a, s * strength) for a, s in zip(self.adapters, self._strengths())]

    def patched(self, strength: float = 1.0):
        """Context manager: adapters attached (each at its strength x `strength`) for the block."""
        if not self.adapters:
            return nullcontext()
        from app.ml.adapters import attached

        return attached(self.base, self.adapter_pairs(strength))


def as_handle(value) -> ModelHandle:
    return value if isinstance(value, ModelHandle) else ModelHandle(value)
