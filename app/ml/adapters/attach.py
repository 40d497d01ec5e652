"""Attach adapters to a shared base model only while a consumer runs (the ComfyUI ModelPatcher lesson).

``attached(bundle, adapter_set, strength)`` registers a forward hook on each adapted base layer and
removes every hook when the ``with`` block ends, even on errors. The hooks compute the adapter's
contribution from the layer's input and output; base weights are only read, never written, so a
cached ``ModelBundle`` is identical before, during (weights) and after any number of attachments,
and a LoRAInject re-run with another rank cannot stack on a previous one.

Several sets can be attached at once (e.g. sampling with two LoRAs): pass a list of
``(adapter_set, strength)`` pairs. Attaching the same set twice at the same time is refused.

Textual-inversion embeddings (``app.ml.embeddings.EmbeddingSet``) may be among them: the tokenizers
and text encoders see their vectors for the block (``app/ml/embeddings/patch.py``). Their strength
is ignored, as in A1111 and ComfyUI, which do not scale embeddings (weight them in the prompt).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .adapter_set import AdapterSet, component_modules
from .config import AdapterError

_ACTIVE: set[int] = set()  # ids of adapter sets currently attached somewhere


def _is_embedding(obj) -> bool:
    return bool(getattr(obj, "is_embedding_set", False))


def _normalise(adapters, strength: float) -> list[tuple[AdapterSet, float]]:
    if adapters is None:
        return []
    if isinstance(adapters, AdapterSet) or _is_embedding(adapters):
        return [(adapters, float(strength))]
    out = []
    for item in adapters:
        if isinstance(item, AdapterSet) or _is_embedding(item):
            out.append((item, float(strength)))
        else:
            aset, s = item
            out.append((aset, float(s)))
    return out


def _check_compatible(bundle, aset: AdapterSet) -> None:
    if aset.family is not None and aset.family.config_dir != bundle.family.config_dir:
        raise AdapterError(
            f"this adapter was made for {aset.family.display_name} but the model is {bundle.family.display_name}"
        )


@contextmanager
def attached(bundle, adapters: "AdapterSet | Sequence | None", strength: float = 1.0) -> Iterator[None]:
    """Apply ``adapters`` to ``bundle``'s UNet and text encoders for the duration of the block.

    ``strength`` scales the adapter's effect (the LoRA weight users set in A1111/ComfyUI). Layer
    shapes are checked up front, so a LoRA for another architecture fails before anything runs.
    """
    pairs = _normalise(adapters, strength)
    embeddings = [a for a, _ in pairs if _is_embedding(a)]
    pairs = [(a, s) for a, s in pairs if not _is_embedding(a)]
    comps = component_modules(bundle)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    owned: list[int] = []
    try:
        for aset, s in pairs:
            if id(aset) in _ACTIVE:
                raise AdapterError("this adapter set is already attached; leave the other `attached` block first")
            _check_compatible(bundle, aset)
            _ACTIVE.add(id(aset))
            owned.append(id(aset))
            for entry in aset.entries():
                if entry.component not in comps:
                    raise AdapterError(f"the adapter targets {entry.component}, which {bundle.family.display_name} does not have")
                try:
                    base = comps[entry.component].get_submodule(entry.name)
                except AttributeError:
                    raise AdapterError(f"the adapter targets {entry.component}.{entry.name}, which this model does not have") from None
                shape = tuple(base.weight.shape)
                want = (entry.module.out_dim, entry.module.in_dim, *entry.module.kernel)
                if shape != want:
                    raise AdapterError(
                        f"{entry.component}.{entry.name}: the adapter is for a {want} layer but the model's is {shape}"
                    )
                handles.append(base.register_forward_hook(_make_hook(entry.module, s)))
        if embeddings:
            from app.ml.embeddings.patch import embeddings_attached

            with embeddings_attached(bundle, embeddings):
                yield
        else:
            yield
    finally:
        for h in handles:
            h.remove()
        for i in owned:
            _ACTIVE.discard(i)


def _make_hook(module, strength: float):
    def hook(base: nn.Module, args, output):
        return module(base, args[0], output, strength)

    return hook


def merged_state_dicts(bundle, adapters, strength: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
    """Per component, a state dict with the adapters merged into copies of the adapted weights.

    Unadapted tensors are the bundle's own (shared, not copied); only adapted layers get new
    tensors. Used to save a merged full model without touching the cached one.
    """
    pairs = [(a, s) for a, s in _normalise(adapters, strength) if not _is_embedding(a)]  # embeddings merge into no weight
    comps = component_modules(bundle)
    out: dict[str, dict[str, torch.Tensor]] = {name: dict(m.state_dict()) for name, m in comps.items()}
    with torch.no_grad():
        for aset, s in pairs:
            _check_compatible(bundle, aset)
            for entry in aset.entries():
                base = comps[entry.component].get_submodule(entry.name)
                key = entry.name + ".weight"
                current = out[entry.component][key]
                tmp = nn.Module()
                tmp.weight = current if isinstance(current, nn.Parameter) else nn.Parameter(current, requires_grad=False)
                merged = entry.module.merged_weight(tmp, s) if base is not None else current
                out[entry.component][key] = merged.to(current.dtype)
    return out
