"""What flows on a LORA socket, and the small rules around it: the family check, splitting a LoRA by
component for separate strengths, and which metadata a re-saved LoRA keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from app.ml.adapters import AdapterError, AdapterSet

# Keys that describe the network's shape or the file itself: written fresh on every save.
_REGENERATED = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_output_name",
                "modelspec.architecture", "modelspec.title", "modelspec.date", "modelspec.hash_sha256",
                "sshs_model_hash", "sshs_legacy_hash", "lora_adapter_metadata")


@dataclass(frozen=True, eq=False)
class LoRA:
    adapters: AdapterSet  # read (or made) for one model; frozen: requires_grad off
    metadata: Mapping[str, str] = field(default_factory=dict)  # the source file's safetensors metadata
    source: str = ""  # file name, or what a tool made it from
    info: Mapping[str, Any] = field(default_factory=dict)

    def __freeze__(self):
        return self  # immutable: tools build new adapter sets, never change this one

    def summary(self) -> dict[str, Any]:
        s = self.adapters.summary()
        out = {"source": self.source, **{k: v for k, v in s.items() if k != "trainable_parameters"}}
        out["parameters"] = sum(p.numel() for p in self.adapters.parameters())
        for k in ("layout", "base_model", "base_model_name", "trigger_words", "title", "has_recipe"):
            if self.info.get(k) not in (None, ""):
                out[k] = self.info[k]
        return out


def _group(family_id: str) -> str:
    return {"sd2-v": "sd2", "flux-dev": "flux", "flux-schnell": "flux"}.get(family_id, family_id)


def check_family(info: Mapping[str, Any], family) -> None:
    """Refuse, by name, a LoRA made for another base model ("this is an SDXL LoRA; the model is SD 1.5")."""
    from .info import FAMILY_NAMES

    found = info.get("family") or ""
    if found and _group(found) != _group(family.id):
        model = FAMILY_NAMES.get(family.id, family.display_name)
        name = FAMILY_NAMES.get(found, found)
        article = "an" if name[:1].upper() in "AEIOU" or name.startswith(("SD", "S")) else "a"
        raise AdapterError(f"{info.get('file', 'the LoRA')}: this is {article} {name} LoRA; the model "
                           f"is {model}. Load it with {article} {name} model, or choose a LoRA for {model}")


def split_components(aset: AdapterSet, denoiser_strength: float, text_strength: float) -> list[tuple[AdapterSet, float]]:
    """``aset`` as (set, strength) pairs: when both strengths agree, one trainable copy (a LoRA is small),
    so a TrainLoop after ApplyLoRA continues it while the LORA output stays as read; else a denoiser
    part and a text-encoder part sharing its modules (frozen; TrainLoop would train only the last)."""
    if denoiser_strength == text_strength:
        import copy

        return [(copy.deepcopy(aset).requires_grad_(True), float(denoiser_strength))]
    den = aset.family.denoiser
    parts = []
    for want, s in ((lambda c: c == den, denoiser_strength), (lambda c: c != den, text_strength)):
        part = AdapterSet(aset.config, aset.family, aset.base_identity, aset.unet_config)
        for e in aset.entries():
            if want(e.component):
                part.add(e.component, e.name, e.module)
        if len(part):
            parts.append((part, float(s)))
    return parts


def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The source file's metadata a converted or resized LoRA keeps (training keys, trigger words, author,
    tag frequencies...); the network shape, title and hashes are written anew for the new file."""
    from app.ml.save.metadata import BASE_PRECISION_KEY

    # the recipe, layout and config are this file's own; the base precision it was trained on stays true
    return {k: v for k, v in metadata.items()
            if v != "" and k not in _REGENERATED and (k == BASE_PRECISION_KEY or not k.startswith("nodetrainer_"))}


def user_metadata(*, title: str = "", author: str = "", description: str = "", trigger_phrase: str = "") -> dict[str, str]:
    """What a user sets on a save: model browsers read ``modelspec.*``, A1111 aliases a LoRA by ``ss_output_name``
    (so a title set here keeps periodic saves of two runs apart)."""
    out = {f"modelspec.{k}": v.strip() for k, v in (("title", title), ("author", author), ("description", description),
                                                    ("trigger_phrase", trigger_phrase)) if v.strip()}
    if title.strip():
        out["ss_output_name"] = title.strip()
    return out


def model_name(bundle) -> str:
    """The base model's file or folder name, as kohya writes ``ss_sd_model_name``."""
    from pathlib import Path

    source = str(getattr(bundle, "source", "") or "")
    return Path(source).name if source and not source.startswith("builtin:") else source
